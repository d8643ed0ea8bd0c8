"""Benchmark suites: synthetic cohorts, BloodMNIST bags (real cells), bank I/O and extraction.

``synthetic`` generates cohorts (AML, ALL, anemia; witness rates from 1% to 20%; bags of 10-2,000 cells),
extracts them and runs the aggregator benchmark on each. ``bloodmnist-bags`` builds bags of real cells
from BloodMNIST's official train split (positive bags hold a fixed fraction of one cell type, with instance
ground truth) and runs the same benchmark. ``io`` and ``extract`` run the scripts ``benchmarks/bench_bank_io.py``
and ``benchmarks/bench_extract.py`` of a source checkout (they are not copied here). Sizes: ``cpu`` is meant
for a 2-core machine in minutes per cohort, ``tiny`` for tests.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from feature_cache.config import Config
from feature_cache.errors import UserError
from milcore.bench.aggregators import BenchSpec

log = logging.getLogger(__name__)

SUITES = ("synthetic", "bloodmnist-bags", "io", "extract")
REPO_ROOT = Path(__file__).resolve().parents[2]
BLOODMNIST_NPZ = REPO_ROOT.parent / "shared" / "data" / "bloodmnist" / "bloodmnist.npz"


@dataclass(frozen=True)
class SynthCase(Config):
    """One synthetic cohort of the suite.

    Attributes:
        name: folder name of the case.
        task: ``aml``, ``all`` or ``anemia``.
        witness_median: median fraction of diagnostic cells in a diseased patient.
        bag_range: smallest and largest bag.
        bag_median: median bag size (``None``: the generator's default).
    """

    name: str
    task: str
    witness_median: float = 0.06
    bag_range: tuple[int, int] = (10, 2000)
    bag_median: int | None = None


SYNTHETIC_CASES = (
    SynthCase("aml", "aml"),
    SynthCase("all", "all"),
    SynthCase("anemia", "anemia"),
    SynthCase("aml_witness_1pct", "aml", witness_median=0.01),
    SynthCase("aml_witness_20pct", "aml", witness_median=0.20),
)

#: Per size: patients per synthetic cohort, BloodMNIST bags, extraction encoder and input size.
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"patients": 60, "bm_bags": 100, "encoder": "efficientnet_lite0", "image_size": 96, "bag_median": None},
    "tiny": {"patients": 40, "bm_bags": 12, "encoder": "toy", "image_size": None, "bag_median": 20},
}


def _size(size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise UserError(f"unknown suite size {size!r} (choose from {', '.join(SIZES)})")
    return SIZES[size]


def _extract(source: str, folder: Path, bank: Path, encoder: str, image_size: int | None, device: str) -> Path:
    from feature_cache.extract import ExtractConfig, extract

    options = {"image_size": image_size} if image_size else {}
    extract(ExtractConfig(source=source, input=str(folder), encoder=encoder, out=str(bank), device=device,
                          encoder_options=options, overwrite=True))  # fmt: skip
    return bank


def synthetic_suite(out: str | Path, template: BenchSpec, size: str = "cpu", seed: int = 0,
                    cases: tuple[SynthCase, ...] = SYNTHETIC_CASES,
                    device: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Generate, extract and benchmark every case; each case's outputs go to ``out/<case>/``.

    Args:
        out: suite folder (cohorts, banks and results).
        template: models, peers, folds, seeds and training settings (bank, cohort and task are filled in).
        size: ``cpu`` or ``tiny``.
        seed: cohort seed.
        cases: the cohorts to run.
        device: extraction device.
    """
    from feature_cache.sources.synthetic import SynthConfig, write_cohort
    from milcore.bench.aggregators import run_benchmark
    from milcore.bench.report import write_outputs

    cfg = _size(size)
    out = Path(out)
    results = {}
    for case in cases:
        work = out / case.name
        lo, hi = case.bag_range
        median = case.bag_median or cfg["bag_median"]
        synth = SynthConfig(task=case.task, patients=cfg["patients"], seed=seed, bag_range=(lo, hi),
                            witness_median=case.witness_median,
                            witness_range=(min(0.01, case.witness_median), max(0.5, case.witness_median)),
                            **({"bag_median": median} if median else {}))  # fmt: skip
        write_cohort(synth, work / "cohort", overwrite=True)
        bank = _extract("synthetic", work / "cohort", work / "bank.h5", cfg["encoder"], cfg["image_size"], device)
        spec = replace(template, bank=str(bank), cohort=str(work / "cohort" / "cohort.csv"), task=case.task)
        result = run_benchmark(spec)
        result["case"] = {"name": case.name, "task": case.task, "witness_median": case.witness_median,
                          "bag_range": list(case.bag_range), "patients": cfg["patients"],
                          "encoder": cfg["encoder"]}  # fmt: skip
        write_outputs(result, work)
        results[case.name] = result
    return results


def bloodmnist_suite(out: str | Path, template: BenchSpec, size: str = "cpu", npz: str | Path | None = None,
                     witness: str = "immature_granulocyte", rate: float = 0.05, seed: int = 0,
                     device: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Bags of real BloodMNIST cells (official train split) with ``rate`` witnesses in positive bags.

    Returns ``{"status": "skipped", "reason": ...}`` when the data set is absent.
    """
    from feature_cache.sources.bloodmnist import BloodMnistBags, make_bloodmnist_bags
    from milcore.bench.aggregators import run_benchmark
    from milcore.bench.report import write_outputs

    if npz is None and not BLOODMNIST_NPZ.exists():
        reason = f"BloodMNIST not found at {BLOODMNIST_NPZ} (../shared/data is absent)"
        log.warning("bloodmnist-bags skipped: %s", reason)
        return {"status": "skipped", "reason": reason}
    npz = bloodmnist_npz(npz)
    cfg = _size(size)
    out = Path(out)
    bags = BloodMnistBags(split="train", bags=cfg["bm_bags"], witness=witness, witness_range=(rate, rate), seed=seed,
                          bag_range=(50, 400) if size == "cpu" else (10, 30))  # fmt: skip
    folder = make_bloodmnist_bags(npz, out / "bags", bags)
    bank = _extract("bloodmnist", folder, out / "bank.h5", cfg["encoder"], cfg["image_size"], device)
    spec = replace(template, bank=str(bank), cohort=str(folder / "cohort.csv"), task="left_shift")
    result = run_benchmark(spec)
    result["case"] = {"witness": witness, "rate": rate, "bags": cfg["bm_bags"], "split": "train",
                      "encoder": cfg["encoder"], "image_size": cfg["image_size"]}  # fmt: skip
    write_outputs(result, out)
    return result


def bloodmnist_npz(npz: str | Path | None) -> Path:
    """The BloodMNIST file to read: ``npz``, else the default under ``../shared/data``.

    Raises:
        UserError: the file does not exist (an explicit ``--npz`` is named as given).
    """
    if npz is not None:
        if not Path(npz).is_file():
            raise UserError(f"--npz {npz}: no such file")
        return Path(npz)
    if not BLOODMNIST_NPZ.is_file():
        raise UserError(f"BloodMNIST not found at {BLOODMNIST_NPZ} (../shared/data is absent); pass --npz FILE")
    return BLOODMNIST_NPZ


@dataclass(frozen=True)
class SuiteOutcome:
    """What one suite of :func:`run_all` did.

    Attributes:
        suite: ``synthetic/<case>``, ``bloodmnist-bags``, ``io`` or ``extract``.
        status: ``ok``, ``skipped`` or ``failed``.
        detail: the reason for a skip or a failure (empty when ok).
        table: the suite's Markdown table (empty unless ok).
    """

    suite: str
    status: str
    detail: str = ""
    table: str = ""


def _attempt(name: str, work: Callable[[], tuple[str, str, str]]) -> SuiteOutcome:
    """Run one suite; an exception becomes a ``failed`` outcome naming it (the traceback goes to the debug log)."""
    try:
        status, detail, table = work()
    except Exception as exc:  # every failure is reported in the summary and in the exit code
        log.error("bench all: %s failed: %s: %s", name, type(exc).__name__, exc)
        log.debug("traceback of %s", name, exc_info=True)
        return SuiteOutcome(name, "failed", f"{type(exc).__name__}: {exc}")
    return SuiteOutcome(name, status, detail, table)


def run_all(out: str | Path, template: BenchSpec, size: str = "cpu", device: str = "auto") -> list[SuiteOutcome]:
    """Every suite at ``size`` into ``out``; one suite's failure does not stop the others.

    Each synthetic case runs on its own, then BloodMNIST bags (skipped, with the reason, when the data set
    is absent), then the ``io`` and ``extract`` scripts (a non-zero exit code is a failure). Writes
    ``out/README.md`` (tables, skips and failures) and ``out/summary.json``.

    Returns:
        One :class:`SuiteOutcome` per suite, in the order run.
    """
    import json
    import time

    from milcore.bench import report

    out = Path(out)
    quick = size == "tiny"
    outcomes = []
    for case in SYNTHETIC_CASES:

        def synth(case: SynthCase = case) -> tuple[str, str, str]:
            result = synthetic_suite(out / "synthetic", template, size=size, cases=(case,), device=device)
            return "ok", "", report.markdown_table(result[case.name])

        outcomes.append(_attempt(f"synthetic/{case.name}", synth))

    def blood() -> tuple[str, str, str]:
        result = bloodmnist_suite(out / "bloodmnist-bags", template, size=size, device=device)
        if result.get("status") == "skipped":
            return "skipped", result["reason"], ""
        return "ok", "", report.markdown_table(result)

    outcomes.append(_attempt("bloodmnist-bags", blood))
    for name in ("io", "extract"):

        def script(name: str = name) -> tuple[str, str, str]:
            rc = script_suite(name, out / name, quick)
            return ("ok", "", f"`{name}/bench.json`\n") if rc == 0 else ("failed", f"exit code {rc}", "")

        outcomes.append(_attempt(name, script))
    lines = [f"# milcore bench all ({size}), {time.strftime('%Y-%m-%d %H:%M %Z')}", ""]
    for o in outcomes:
        body = {"ok": o.table, "skipped": f"skipped: {o.detail}\n", "failed": f"FAILED: {o.detail}\n"}[o.status]
        lines += [f"## {o.suite}", "", body]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines))
    summary = {"size": size, "suites": [{"suite": o.suite, "status": o.status, "detail": o.detail} for o in outcomes]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return outcomes


def load_script(name: str, root: Path = REPO_ROOT) -> Any:
    """Import ``benchmarks/<name>.py`` of a source checkout as a module."""
    path = root / "benchmarks" / f"{name}.py"
    if not path.exists():
        raise UserError(f"{path}: benchmark script not found (the io and extract suites need a source checkout)")
    module_spec = importlib.util.spec_from_file_location(f"milcore_bench_script_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def script_suite(name: str, out: str | Path, quick: bool, extra: list[str] | None = None) -> int:
    """Run ``benchmarks/bench_<name>.py`` (``io`` -> bench_bank_io) with ``--out`` (and ``--quick``)."""
    script = {"io": "bench_bank_io", "extract": "bench_extract"}[name]
    main: Callable[[list[str]], int] = load_script(script).main
    argv = ["--out", str(out), *(["--quick"] if quick else []), *(extra or [])]
    log.info("running benchmarks/%s.py %s", script, " ".join(argv))
    return int(main(argv) or 0)
