"""Result files written so that a crash never leaves half of one: strict JSON and rendered reports.

Each file is written under a temporary name and renamed into place (``os.replace`` is atomic on one
file system), so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean_json(payload), indent=1, default=_default, allow_nan=False))
    os.replace(tmp, path)


def clean_json(obj: Any) -> Any:
    """A copy with NaN/inf floats as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_report_atomic(out: Path, report, name: str) -> tuple[Path, Path]:
    """Render a :class:`milcore.report.Report` in a scratch folder, then move its files into ``out``."""
    scratch = out / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    html, md = report.write(scratch, name)
    figures = scratch / f"{name}_files"
    if figures.exists():
        shutil.rmtree(out / f"{name}_files", ignore_errors=True)
        os.replace(figures, out / f"{name}_files")
    os.replace(html, out / html.name)
    os.replace(md, out / md.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return out / html.name, out / md.name
