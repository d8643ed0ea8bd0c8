"""Join the parts of a benchmark run as a job array (``milcore bench aggregators --fold K`` / ``--seeds S``).

Each part is a folder written by ``milcore bench aggregators``: its ``bench.json`` records the whole
spec (with ``fold`` when only one outer fold ran, and the ``seeds`` it ran), the fingerprints of the bank
and labels (``inputs``) and every fold's split assignment. :func:`check_parts` checks, before anything
is written, that the parts benchmark the same thing (spec apart from :data:`PART_KEYS`;
the training options apart from where they ran, :data:`WHERE_KEYS`;
bank, labels, classes, precision, torchmil version), with equal splits for a seed they share, and that
together they hold every (seed, fold) pair of their seeds exactly once. :func:`merge_parts` then orders
the runs as the single-process benchmark orders them and summarises them with the same code
(:func:`~milcore.bench.aggregators.summarize_runs`): ``runs`` and ``summary`` metrics equal the
single-process ones. Timing fields (``seconds``, ``cpu_seconds``) are summed over the parts, and each
part's wall time, CPU time, machine and load are listed under ``parts``: they come from several jobs
(the top-level ``machine``, ``torch_threads`` and ``workers`` are the first part's). With
``allow_partial``, missing folds are accepted and the result says so everywhere (``partial``, a critical
warning, the table's first line, the report's title).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feature_cache.errors import OutputExistsError, UserError
from milcore.training.config import PLACEMENT_OPTIONS

log = logging.getLogger(__name__)

#: ``spec`` entries that may differ between parts: what each part holds, how many processes it used, and the
#: paths of the bank and cohort (compared through their fingerprints, ``inputs``: a job on another machine may
#: mount them elsewhere; the merged spec keeps the first part's paths).
PART_KEYS = ("fold", "seeds", "workers", "bank", "cohort")
#: Training options that say where and how fast a part computed, not what it learnt: they may differ between
#: parts (the list ``--resume`` accepts too, declared once in ``milcore.training.config``).
WHERE_KEYS = PLACEMENT_OPTIONS
#: Top-level ``bench.json`` entries that must be equal across parts (with ``spec`` and the splits).
SAME_KEYS = ("benchmark", "inputs", "classes", "bags", "ood_bags", "ood_bag_ids", "encoder", "instance_ground_truth",
             "torchmil", "precision", "class_counts")  # fmt: skip
#: Per-part entries listed under ``parts`` in the merged ``bench.json``.
TIMING_KEYS = ("seconds", "cpu_seconds", "load_average_before", "load_average_after", "machine", "torch_threads",
               "workers")  # fmt: skip


def is_bench_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``bench.json`` (a benchmark rather than a training run)."""
    return (Path(path) / "bench.json").is_file()


def read_part(path: str | Path) -> dict[str, Any]:
    """The ``bench.json`` of one part; one-line errors naming ``path``."""
    path = Path(path)
    file = path / "bench.json"
    if not file.is_file():
        raise UserError(f"{path}: no bench.json (not a folder written by milcore bench aggregators)")
    try:
        result = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: unreadable ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(result, dict) or result.get("benchmark") != "aggregators" or "case" in result:
        raise UserError(f"{file}: not a 'milcore bench aggregators' result (the synthetic, bloodmnist-bags and "
                        "rare-witness suites are not split into parts)")  # fmt: skip
    missing = [k for k in ("spec", "runs", "splits", "inputs") if k not in result]
    if missing:
        raise UserError(f"{file}: no {', '.join(missing)} (written by an older milcore; rerun that part)")
    if result.get("merged_from"):
        raise UserError(f"{file}: already a merged benchmark (merge the parts it was joined from)")
    return result


def part_pairs(result: dict[str, Any]) -> list[tuple[int, int]]:
    """The (seed, fold) pairs a part holds: its seeds x (its ``fold``, or every fold)."""
    spec = result["spec"]
    folds = range(int(spec["folds"])) if spec.get("fold") is None else [int(spec["fold"])]
    return [(int(s), f) for s in spec["seeds"] for f in folds]


def _comparable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in PART_KEYS}
    out["train"] = {k: v for k, v in (spec.get("train") or {}).items() if k not in WHERE_KEYS}
    return out


def _differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Entries on which two parts differ in what they benchmark (not in what they hold or where they ran)."""
    a, b = _comparable_spec(first["spec"]), _comparable_spec(other["spec"])
    diff = [f"spec.{k}" for k in sorted(set(a) | set(b)) if k != "train" and a.get(k) != b.get(k)]
    diff += [f"spec.train.{k}" for k in sorted(set(a["train"]) | set(b["train"]))
             if a["train"].get(k) != b["train"].get(k)]  # fmt: skip
    diff += [k for k in SAME_KEYS if first.get(k) != other.get(k)]
    return diff


def check_parts(paths: Sequence[str | Path], *, allow_partial: bool = False
                ) -> tuple[list[dict[str, Any]], dict[tuple[int, int], Path]]:  # fmt: skip
    """Check that ``paths`` are parts of one benchmark holding each (seed, fold) pair once, and no pair missing.

    Args:
        paths: the parts' folders.
        allow_partial: accept missing folds (the merge then marks the result as partial everywhere).

    Returns:
        The parts' ``bench.json`` payloads (in the order given) and the folder of each (seed, fold) pair.

    Raises:
        UserError: no folders, a folder that is not a benchmark part, parts of different specs, inputs or
            splits (naming the entries), a (seed, fold) pair given twice, or folds of a seed missing (naming
            them and the command that runs them) unless ``allow_partial``.
    """
    if not paths:
        raise UserError("report merge: no benchmark folders given")
    folders = [Path(p) for p in paths]
    parts = [read_part(p) for p in folders]
    first = parts[0]
    owner: dict[tuple[int, int], Path] = {}
    splits: dict[str, tuple[Any, Path]] = {}
    for folder, part in zip(folders, parts, strict=True):
        diff = _differences(first, part)
        if diff:
            raise UserError(f"{folder}: benchmarks other models, options or inputs than {folders[0]} (differ: "
                            f"{', '.join(diff)}); only parts of one benchmark can be merged")  # fmt: skip
        for seed, assignment in part["splits"].items():
            if seed in splits and splits[seed][0] != assignment:
                raise UserError(f"{folder}: the splits of seed {seed} differ from those of {splits[seed][1]}")
            splits.setdefault(seed, (assignment, folder))
        for pair in part_pairs(part):
            if pair in owner:
                raise UserError(f"{folder}: seed {pair[0]} fold {pair[1]} given twice (also {owner[pair]})")
            owner[pair] = folder
        claimed = set(part_pairs(part))
        stray = [(r["seed"], r["fold"]) for r in part["runs"] if (r["seed"], r["fold"]) not in claimed]
        if stray:
            raise UserError(f"{folder}/bench.json: runs of seed {stray[0][0]} fold {stray[0][1]}, which its spec does "
                            "not hold (edited or corrupt)")  # fmt: skip
    k = int(first["spec"]["folds"])
    missing = missing_folds(parts)
    if missing and not allow_partial:
        seed, folds = next(iter(missing.items()))
        raise UserError(f"report merge: seed {seed}: fold(s) {', '.join(map(str, folds))} of {k} (0 to {k - 1}) "
                        f"missing; run them with milcore bench aggregators ... --seeds {seed} --fold K (same "
                        "options) and pass their folders (or --allow-partial)")  # fmt: skip
    return parts, owner


def missing_folds(parts: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Seed -> the folds no part holds, for every seed some part holds (empty: the benchmark is whole)."""
    held = {pair for part in parts for pair in part_pairs(part)}
    k = int(parts[0]["spec"]["folds"])
    out = {seed: [f for f in range(k) if (seed, f) not in held] for seed in sorted({s for s, _ in held})}
    return {seed: folds for seed, folds in out.items() if folds}


def partial_message(missing: dict[int, list[int]], folds: int) -> str:
    """The sentence a partial benchmark carries in its warnings, table and report."""
    where = "; ".join(f"seed {s}: fold(s) {', '.join(map(str, f))}" for s, f in missing.items())
    return (f"PARTIAL benchmark (merged with --allow-partial): {where} of {folds} missing. Every mean, sd and CI is "
            "over the folds present only: not comparable with a whole benchmark's, and not a result to publish.")


def _merged_seeds(parts: list[dict[str, Any]]) -> list[int]:
    """The parts' seeds in the order a single process runs them: the order given when every part has the same
    seeds (a fold per job), ascending otherwise (a seed per job)."""
    orders = {tuple(p["spec"]["seeds"]) for p in parts}
    if len(orders) == 1:
        return [int(s) for s in next(iter(orders))]
    return sorted({int(s) for p in parts for s in p["spec"]["seeds"]})


def merge_parts(parts: list[dict[str, Any]], folders: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """The ``bench.json`` payload of the whole benchmark from checked parts (:func:`check_parts`).

    Runs are ordered seed by seed, fold by fold and, inside a fold, as the part ran them (ours then the
    peers), which is the single-process order; the summary, warnings, peer comparison and tuning
    comparison are recomputed from them by :func:`~milcore.bench.aggregators.summarize_runs`.
    """
    from milcore.bench.aggregators import summarize_runs
    from milcore.bench.config import BenchSpec

    first = parts[0]
    seeds = _merged_seeds(parts)
    spec_dict = {**first["spec"], "seeds": seeds, "fold": None}
    spec = BenchSpec.from_dict(spec_dict)
    by_pair: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for part in parts:
        for row in part["runs"]:
            by_pair.setdefault((int(row["seed"]), int(row["fold"])), []).append(row)
    rows = [row for seed in seeds for fold in range(spec.folds) for row in by_pair.get((seed, fold), [])]
    peers_installed = first.get("torchmil") not in ("not installed", "not requested")
    derived = summarize_runs(rows, spec, first["class_counts"], peers_installed=peers_installed)
    names = [str(f) for f in folders] if folders is not None else [f"part {i}" for i in range(len(parts))]
    listed = [{"folder": name, "seeds": p["spec"]["seeds"], "fold": p["spec"].get("fold"),
               **{k: p.get(k) for k in TIMING_KEYS}} for name, p in zip(names, parts, strict=True)]  # fmt: skip
    result = {key: value for key, value in first.items() if key not in ("tuning", "ood_bag_ids")}
    result.update({
        "spec": spec.to_dict(), "runs": rows, "summary": derived["summary"], "peers": derived["peers"],
        "splits": {str(s): _splits_of(parts, s) for s in seeds},
        "seconds": float(sum(p.get("seconds") or 0.0 for p in parts)),
        "cpu_seconds": float(sum(p.get("cpu_seconds") or 0.0 for p in parts)),
        "warnings": derived["warnings"], "failed": derived["failed"],
        "timing": f"seconds and cpu_seconds are sums over {len(parts)} jobs (parts); each job's own wall time, CPU "
                  "time, machine and load are listed under parts",
        "parts": listed, "merged_from": names,
    })  # fmt: skip
    if "tuning" in derived:
        result["tuning"] = derived["tuning"]
    missing = missing_folds(parts)
    if missing:
        message = partial_message(missing, spec.folds)
        result["partial"] = {"missing": [{"seed": s, "folds": f} for s, f in missing.items()], "message": message}
        result["warnings"] = [{"code": "partial", "severity": "critical", "message": message}, *result["warnings"]]
    if first.get("ood_bag_ids"):
        result["ood_bag_ids"] = first["ood_bag_ids"]
    return result


def _splits_of(parts: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The split assignment of ``seed`` recorded by the parts (equal in every part that holds it)."""
    return next(p["splits"][str(seed)] for p in parts if str(seed) in p["splits"])


def merge_benches(paths: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                  allow_partial: bool = False) -> dict[str, Any]:  # fmt: skip
    """Join benchmark parts into the folder ``out`` of the whole benchmark (see the module docstring).

    Writes ``bench.json``, ``table.md`` and ``report.html``/``report.md`` as ``milcore bench aggregators``
    does (:func:`milcore.bench.report.write_outputs`).

    Args:
        paths: folders of ``milcore bench aggregators --fold K`` (or ``--seeds S``), any order.
        out: the folder to write (must not exist or be empty, unless ``overwrite``).
        overwrite: replace a non-empty ``out``.
        allow_partial: merge although folds are missing; the result then says so in ``bench.json``
            (``partial`` and a critical warning), ``table.md`` and the report.

    Returns:
        The merged ``bench.json`` payload.

    Raises:
        UserError: see :func:`check_parts`; an occupied ``out``; an ``out`` that is one of the inputs.
    """
    from milcore.bench.report import write_outputs

    out = Path(out)
    parts, _ = check_parts(paths, allow_partial=allow_partial)
    if any(out.resolve() == Path(p).resolve() for p in paths):
        raise UserError(f"{out}: the output is also an input benchmark folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite)")
    result = merge_parts(parts, [str(p) for p in paths])
    if out.is_dir():
        shutil.rmtree(out)
    try:
        write_outputs(result, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("report merge: %d benchmark parts joined into %s (%d runs)", len(parts), out, len(result["runs"]))
    return result
