"""Where a whole benchmark fit spends its CPU time: one ``milcore bench aggregators`` fit under the torch profiler.

Runs the bench job in this process (one worker, one thread, ``--seeds 0 --fold K``) with
``torch.profiler`` recording every operator, and writes the operators by self CPU time (total, share of
the profiled time, calls) as ``profile.json`` and ``profile.md`` into ``--out``. The profile covers
the whole job (reading the bank, the fit, validation, calibration and the report), which is what made
work that a training-step profile does not show visible (the speed rounds of ``benchmarks/README.md``).
Run it from a frozen copy of a commit (``PYTHONPATH=COPY python benchmarks/profile_fit.py ...``, from a
directory other than the repository's root) to profile that commit's code.

Usage: ``python benchmarks/profile_fit.py --bank B --cohort C --task aml --model dtfd --out DIR [--fold 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("profile_fit")


def profile_fit(bank: str, cohort: str, task: str, model: str, fold: int = 1, top: int = 30,
                epochs: int | None = None) -> dict:
    """Profile one fit of ``model`` (seed 0, outer fold ``fold``; ``epochs``: the bench's default when None) of
    ``milcore bench aggregators``.

    Returns:
        ``{"model", "fold", "total_self_cpu_ms", "operators": [{"name", "self_cpu_ms", "share", "calls"}]}``
        with the ``top`` operators by self CPU time.
    """
    import milcore
    from milcore.cli import main

    torch.set_num_threads(1)
    extra = ["--epochs", str(epochs)] if epochs else []
    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU]) as prof:
        code = main(["bench", "aggregators", "--bank", bank, "--cohort", cohort, "--task", task, "--peers", "none",
                     "--models", model, "--seeds", "0", "--fold", str(fold), "--workers", "1", "--threads", "1",
                     "-q", "--out", str(Path(tmp) / "bench"), *extra])  # fmt: skip
    if code:
        raise SystemExit(f"the bench job failed (exit code {code})")
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    ops = [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
            "calls": e.count} for e in events[:top]]  # fmt: skip
    return {"model": model, "fold": fold, "milcore": str(Path(milcore.__file__).parent),
            "torch": torch.__version__, "total_self_cpu_ms": total / 1e3, "operators": ops}  # fmt: skip


def to_markdown(result: dict) -> str:
    """The operator table of :func:`profile_fit` as Markdown."""
    lines = [f"Profile of one `{result['model']}` fit (seed 0, fold {result['fold']}), whole bench job: "
             f"{result['total_self_cpu_ms'] / 1e3:.2f} s self CPU in all operators; "
             f"milcore from `{result['milcore']}`.",
             "", "| operator | self CPU ms | share | calls |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| `{o['name']}` | {o['self_cpu_ms']:,.1f} | {100 * o['share']:.1f} % | {o['calls']:,} |"
              for o in result["operators"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", required=True)
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--task", default="aml")
    parser.add_argument("--model", required=True, help="a registered aggregator")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--top", type=int, default=30, help="operators listed")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the bench's)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = profile_fit(args.bank, args.cohort, args.task, args.model, args.fold, args.top, args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    (out / "profile.md").write_text(to_markdown(result))
    log.info("%s", to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
