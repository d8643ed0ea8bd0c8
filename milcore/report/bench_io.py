"""Shared output of the benchmark scripts: machine description, ``bench.json`` and the printed table."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("milcore.bench")


def machine_info() -> dict[str, Any]:
    """Platform, Python, CPU count, load average and time: recorded with every result."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "load_average": load, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip


def save_bench(out: str | Path, result: dict[str, Any], table: str) -> Path:
    """Write ``OUT/bench.json``, print the table on stdout and log where it went; returns the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    sys.stdout.write(table + "\n")
    log.info("wrote %s", path)
    return path
