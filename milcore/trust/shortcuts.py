"""Shortcut detection: does anything other than the cells' morphology predict the label?

A model can learn the acquisition source instead of the disease (WBCAtt+ dataset bias; the real anemia
fields are that case: each diagnosis came from one source). For each non-morphological signal a simple
scikit-learn model (one-hot categories, standardised and quantile-binned numbers, a class-balanced
logistic regression) is fitted on that signal alone, with the SAME patient-level folds as the training
run, and its out-of-fold balanced accuracy is set beside the aggregator's:

- ``site``: the cohort's acquisition site column;
- ``date``: the acquisition date (days since the earliest; ISO dates);
- ``bag_size``: cells per patient (the bank);
- ``image_size``: mean crop height and width per patient (the crops);
- ``colour``: mean and standard deviation of each RGB channel of the background around the cells (the brighter
  half of each crop's frame: the stain and the scanner, not the cells, whose colour is morphology) over a
  sample of each patient's crops;
- ``metadata:<column>``: every other stored cohort column (sex, age, scanner...), one check each.

A check is **flagged** when the signal is significantly associated with the label (:func:`association_p`:
a permutation test of Pillai's trace, the sum of the squared canonical correlations between the signal's
features and the class indicators; exact under the null because the statistic is recomputed from the
shuffled labels alone; Holm-corrected over the checks of the run so that a clean cohort is not flagged by
one of many tests, ``p_holm < alpha``) AND its out-of-fold balanced accuracy reaches at least ``min_share``
of the aggregator's gain over chance: ``(BA_check - 1/C) / (BA_model - 1/C) >= min_share``. A signal
that is absent (no site column, no crops, a constant value, an id-like column) is skipped and named.
The result (``shortcuts.json`` in the run folder) is read by the model passport.
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from milcore.trust.shortcut_config import ShortcutConfig

log = logging.getLogger(__name__)

SHORTCUTS_FORMAT = "milcore-shortcuts"
#: Cohort columns read as the acquisition site / date (first present wins).
SITE_COLUMNS = ("site", "centre", "center", "hospital", "source")
DATE_COLUMNS = ("date", "acquisition_date", "scan_date", "collection_date")
#: Cohort columns that are never metadata checks (ids, groupings).
ID_COLUMNS = ("bag_id", "patient_id", "patient", "slide_id", "case_id", "split", "fold")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class Signal:
    """One non-morphological signal, per patient.

    Attributes:
        name: the check's name (``site``, ``colour``...).
        values: (B, k) object array; categorical columns hold strings, numeric ones floats (NaN = missing).
        kinds: per column, ``"cat"`` or ``"num"``.
        columns: column names.
        source: where it was read from.
    """

    name: str
    values: np.ndarray
    kinds: tuple[str, ...]
    columns: tuple[str, ...]
    source: str = ""


@dataclass
class ShortcutResult:
    """The shortcut checks of one run.

    Attributes:
        model_balanced_accuracy: the aggregator's out-of-fold balanced accuracy.
        chance: 1 / classes.
        checks: one entry per fitted check (``name``, ``balanced_accuracy``, ``p_value``, ``share_of_model``,
            ``flagged``, ``columns``, ``source``).
        skipped: ``{"name", "reason"}`` per check not run.
        patients: patients checked.
        classes: class names.
        config: the settings.
    """

    model_balanced_accuracy: float
    chance: float
    checks: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    patients: int
    classes: list[str]
    config: ShortcutConfig = field(default_factory=lambda: ShortcutConfig())

    @property
    def flagged(self) -> list[str]:
        """Names of the flagged checks."""
        return [c["name"] for c in self.checks if c["flagged"]]

    def headline(self) -> str:
        """One sentence for the passport and the log."""
        if self.flagged:
            worst = max((c for c in self.checks if c["flagged"]), key=lambda c: c["balanced_accuracy"])
            return (f"SHORTCUT: {', '.join(self.flagged)} predict(s) the label without the cells (best: "
                    f"{worst['name']}, balanced accuracy {worst['balanced_accuracy']:.3f} vs the model's "
                    f"{self.model_balanced_accuracy:.3f})")  # fmt: skip
        names = ", ".join(c["name"] for c in self.checks) or "none"
        return f"no shortcut flagged among {len(self.checks)} checks ({names})"

    def to_json(self) -> dict[str, Any]:
        """``shortcuts.json``: read by the model passport (``flagged``, ``summary.headline``, ``skipped``)."""
        return {"format": SHORTCUTS_FORMAT, "format_version": 1, "summary": {"headline": self.headline()},
                "flagged": self.flagged, "model": {"balanced_accuracy": self.model_balanced_accuracy},
                "chance": self.chance, "patients": self.patients, "classes": self.classes, "checks": self.checks,
                "skipped": self.skipped, "config": self.config.to_dict()}  # fmt: skip


# ------------------------------------------------------------------------------------------- statistics


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy of ``pred`` against one or many label rows: y (n,) or (P, n) -> scalar or (P,).

    Classes absent from a row are left out of its mean (as scikit-learn does).
    """
    y2 = np.atleast_2d(y)  # (P, n)
    hits = y2 == pred[None, :]  # (P, n)
    recalls, present = [], []
    for k in range(n_classes):
        in_k = y2 == k
        count = in_k.sum(axis=1)
        recalls.append(np.where(count > 0, (hits & in_k).sum(axis=1) / np.maximum(count, 1), 0.0))
        present.append(count > 0)
    out = np.sum(recalls, axis=0) / np.maximum(np.sum(present, axis=0), 1)
    return out if np.ndim(y) == 2 else float(out[0])


def association_p(signal: Signal, y: np.ndarray, n_classes: int, permutations: int, seed: int,
                  chunk: int = 250) -> float:  # fmt: skip
    """Permutation p-value that a signal is associated with the label: Pillai's trace (the sum of the squared
    canonical correlations between the signal's features, one-hot categories and standardised numbers fitted on
    every patient, and the class indicators) of the labels against that of ``permutations`` shuffles of them.
    (No quantile bins here: with bins a 6-column signal has 30 features, and when the features span almost
    every patient every labelling reaches the same trace and the test has no power.)

    The statistic is ``sum_k |sum_{i in k} q_i|^2 / n_k`` over the rows ``q_i`` of an orthonormal basis of the
    centred features, so a shuffle costs one (n, K) x (n, r) product. Unlike shuffling labels against fixed
    out-of-fold predictions (which were fitted on those labels: 9-10 % rejections of unrelated signals at a
    nominal 5 %, measured), the test is exact under the null of a signal independent of the label.
    """
    everyone = np.ones(len(y), dtype=bool)
    x, _ = _design(signal, everyone, 0)  # (n, p)
    x = x - x.mean(axis=0)
    u, sv, _ = np.linalg.svd(x, full_matrices=False)
    q = u[:, sv > sv.max(initial=0.0) * 1e-8 * max(x.shape)] if sv.size else u[:, :0]  # (n, r)
    if q.shape[1] == 0:
        return 1.0
    counts = np.bincount(y, minlength=n_classes).astype(float)
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)  # (K,)

    def pillai(labels: np.ndarray) -> np.ndarray:  # (P, n) -> (P,)
        onehot = np.zeros((labels.shape[0], n_classes, labels.shape[1]))  # (P, K, n)
        np.put_along_axis(onehot, labels[:, None, :], 1.0, axis=1)
        sums = onehot @ q  # (P, K, r)
        return ((sums**2).sum(-1) * inv).sum(-1)

    observed = pillai(y[None, :])[0]
    rng = np.random.default_rng(seed)
    above = 0
    for start in range(0, permutations, chunk):
        k = min(chunk, permutations - start)
        shuffled = np.stack([rng.permutation(y) for _ in range(k)])  # (k, n)
        above += int(np.sum(pillai(shuffled) >= observed - 1e-9))
    return float((1 + above) / (1 + permutations))


def holm(p: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1).

    Written here because ``milcore.audit.statistics.adjust_pvalues`` sits in a layer above the trust layer.
    """
    p_arr = np.asarray(p, dtype=float)
    order = np.argsort(p_arr, kind="stable")
    m = len(p_arr)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p_arr[order]) if m else p_arr
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out.tolist()


def _design(signal: Signal, train: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of a signal for one fold, fitted on the training rows: one-hot categories, standardised and
    quantile-binned numbers (NaN imputed by the training median). Every row may be a training row (no test rows)."""
    from sklearn.preprocessing import KBinsDiscretizer, OneHotEncoder

    parts_tr, parts_te = [], []
    for j, kind in enumerate(signal.kinds):
        col = signal.values[:, j]
        if kind == "cat":
            enc = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
            x = col.astype(str).reshape(-1, 1)
            parts_tr.append(enc.fit_transform(x[train]))
            parts_te.append(enc.transform(x[~train]) if (~train).any() else parts_tr[-1][:0])
            continue
        x = col.astype(float).reshape(-1, 1)
        med = np.nanmedian(x[train]) if np.isfinite(x[train]).any() else 0.0
        x = np.where(np.isfinite(x), x, med)
        mu, sd = x[train].mean(), x[train].std() or 1.0
        parts_tr.append((x[train] - mu) / sd)
        parts_te.append((x[~train] - mu) / sd)
        n_bins = min(bins, len(np.unique(x[train])))
        if n_bins >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kb = KBinsDiscretizer(n_bins=n_bins, encode="onehot-dense", strategy="quantile")
                parts_tr.append(kb.fit_transform(x[train]))
                parts_te.append(kb.transform(x[~train]) if (~train).any() else parts_tr[-1][:0])
    return np.hstack(parts_tr), np.hstack(parts_te)


def fit_signal(signal: Signal, y: np.ndarray, folds: np.ndarray, config: ShortcutConfig) -> np.ndarray:
    """Out-of-fold predictions (B,) of a class-balanced logistic regression on one signal, fold by fold."""
    from sklearn.linear_model import LogisticRegression

    pred = np.full(len(y), -1, dtype=np.int64)
    for k in np.unique(folds):
        test = folds == k
        train = ~test
        classes = np.unique(y[train])
        if len(classes) < 2:
            pred[test] = classes[0] if len(classes) else 0
            continue
        x_tr, x_te = _design(signal, train, config.bins)
        clf = LogisticRegression(C=config.c, class_weight="balanced", max_iter=2000)
        clf.fit(x_tr, y[train])
        pred[test] = clf.predict(x_te)
    return pred


def run_checks(signals: Sequence[Signal], y: np.ndarray, folds: np.ndarray, model_pred: np.ndarray,
               classes: Sequence[str], config: ShortcutConfig | None = None,
               skipped: Sequence[Mapping[str, str]] = ()) -> ShortcutResult:  # fmt: skip
    """Fit each signal alone with the given folds and compare it with the aggregator.

    Args:
        signals: the per-patient signals (rows aligned with ``y``).
        y: (B,) int labels.
        folds: (B,) test fold of each patient (the run's).
        model_pred: (B,) the aggregator's out-of-fold predicted class.
        classes: class names.
        config: settings.
        skipped: checks already known to be impossible (name, reason).

    Returns:
        The result; signals that turn out constant are added to ``skipped``.
    """
    config = config or ShortcutConfig()
    n_classes = len(classes)
    chance = 1.0 / n_classes
    model_ba = balanced_accuracy(y, model_pred, n_classes)
    gain = model_ba - chance
    checks, skip = [], [dict(s) for s in skipped]
    for i, s in enumerate(signals):
        reason = constant_reason(s)
        if reason:
            skip.append({"name": s.name, "reason": reason})
            continue
        pred = fit_signal(s, y, folds, config)
        ba = balanced_accuracy(y, pred, n_classes)
        p = association_p(s, y, n_classes, config.permutations, config.seed + i)
        share = (ba - chance) / gain if gain > 1e-9 else (np.inf if ba > chance else 0.0)
        checks.append({"name": s.name, "columns": list(s.columns), "source": s.source,
                       "balanced_accuracy": round(float(ba), 4), "p_value": round(p, 5),
                       "share_of_model": round(float(share), 3) if np.isfinite(share) else None})  # fmt: skip
    for c, p_holm in zip(checks, holm([c["p_value"] for c in checks]), strict=True):
        share = np.inf if c["share_of_model"] is None else c["share_of_model"]
        c["p_holm"] = round(p_holm, 5)
        c["flagged"] = bool(p_holm < config.alpha and share >= config.min_share)
    return ShortcutResult(float(model_ba), chance, checks, skip, len(y), list(classes), config)


def constant_reason(signal: Signal) -> str | None:
    """Why a signal cannot predict anything (every patient alike), or ``None``."""
    distinct = {tuple(str(v) for v in row) for row in signal.values}
    if len(distinct) <= 1:
        example = ", ".join(f"{c}={v}" for c, v in zip(signal.columns, signal.values[0], strict=True)) if len(
            signal.values) else "no patient"  # fmt: skip
        return f"the same for every patient ({example})"
    return None


# ------------------------------------------------------------------------------------------- signals


def _first(columns: Mapping[str, np.ndarray], names: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _as_number(col: np.ndarray) -> np.ndarray | None:
    """Floats when every non-empty value is a number, else ``None``."""
    out = np.full(len(col), np.nan)
    for i, v in enumerate(col):
        if v == "":
            continue
        try:
            out[i] = float(v)
        except ValueError:
            return None
    return out


def _dates(col: np.ndarray) -> tuple[np.ndarray, int]:
    """Days since the earliest parseable ISO date (NaN where missing or unparseable) and the unparseable count."""
    days, bad = np.full(len(col), np.nan), 0
    for i, v in enumerate(col):
        if v == "":
            continue
        try:
            days[i] = dt.date.fromisoformat(str(v)[:10]).toordinal()
        except ValueError:
            bad += 1
    if np.isfinite(days).any():
        days -= np.nanmin(days)
    return days, bad


def cohort_signals(columns: Mapping[str, np.ndarray], where: str, exclude: Sequence[str] = (),
                   ignore: Sequence[str] = ()) -> tuple[list[Signal], list[dict[str, str]]]:  # fmt: skip
    """Site, date and the other stored columns of a cohort table (rows aligned with the patients).

    Args:
        columns: column name -> (B,) strings (``""`` = missing), the label column excluded.
        where: the table's path, for messages.
        exclude: columns that are not metadata (the label, the patient grouping).
        ignore: columns the user left out (named among the skipped checks).

    Returns:
        The signals, and the checks skipped with their reason (no site column, no date column, unparseable
        dates, id-like columns).
    """
    signals: list[Signal] = []
    skipped = [{"name": f"metadata:{c}", "reason": "left out by the user (ignore)"} for c in ignore if c in columns]
    site = _first(columns, SITE_COLUMNS)
    if site is None:
        skipped.append({"name": "site", "reason": f"{where} has no site column ({', '.join(SITE_COLUMNS)})"})
    else:
        signals.append(Signal("site", np.asarray(columns[site], dtype=object).reshape(-1, 1), ("cat",), (site,), where))
    date = _first(columns, DATE_COLUMNS)
    if date is None:
        skipped.append({"name": "date", "reason": f"{where} has no date column ({', '.join(DATE_COLUMNS)})"})
    else:
        days, bad = _dates(columns[date])
        if bad > len(days) // 2:
            skipped.append({"name": "date", "reason": f"{where}: column {date!r}: {bad} of {len(days)} values are not "
                            "ISO dates (YYYY-MM-DD)"})  # fmt: skip
        else:
            signals.append(Signal("date", days.astype(object).reshape(-1, 1), ("num",), (date,), where))
    taken = {site, date, *exclude, *ID_COLUMNS, *ignore}
    for name, col in columns.items():
        if name in taken or name.lower() in taken:
            continue
        col = np.asarray(col, dtype=object)
        number = _as_number(col)
        filled = col[col != ""]
        if number is None and len(filled) and len(set(filled.tolist())) > 0.5 * len(col):
            skipped.append({"name": f"metadata:{name}", "reason": f"{where}: column {name!r} is id-like "
                            f"({len(set(filled.tolist()))} distinct values for {len(col)} patients)"})  # fmt: skip
            continue
        if number is not None:
            signals.append(Signal(f"metadata:{name}", number.astype(object).reshape(-1, 1), ("num",), (name,), where))
        else:
            signals.append(Signal(f"metadata:{name}", col.reshape(-1, 1), ("cat",), (name,), where))
    return signals, skipped


def background_pixels(rgb: np.ndarray, frame: float = 0.1) -> np.ndarray:
    """(n, 3) the background of a cell crop: the brighter half of its outer frame (``frame`` of each side).

    Crops are centred on their cell, so the frame is mostly plasma and glass (the stain and the scanner); its
    brighter half leaves out the edges of the cell or of its neighbours. The cells' own colour is morphology (a
    blast is bluer), which may follow the diagnosis without any shortcut.
    """
    h, w = rgb.shape[:2]
    k = max(1, round(frame * min(h, w)))
    ring = np.ones((h, w), dtype=bool)
    ring[k : h - k, k : w - k] = False
    px = rgb[ring].reshape(-1, 3)  # (m, 3)
    bright = px.mean(axis=1)
    return px[bright >= np.median(bright)]


def crop_signals(root: str | Path, bag_ids: Sequence[str], max_crops: int = 24, seed: int = 0
                 ) -> tuple[list[Signal], list[dict[str, str]]]:  # fmt: skip
    """Image size and background colour statistics (:func:`background_pixels`) per patient from a sample of its crops
    (``ROOT/<bag_id>/*.png``).

    Returns:
        ``image_size`` and ``colour`` signals, or both skipped (naming the folder) when no patient has a crop.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    size = np.full((len(bag_ids), 2), np.nan)
    colour = np.full((len(bag_ids), 6), np.nan)
    found = 0
    for i, b in enumerate(bag_ids):
        folder = root / b
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            continue
        if len(files) > max_crops:
            files = [files[j] for j in np.sort(rng.choice(len(files), size=max_crops, replace=False))]
        dims, pix = [], []
        for f in files:
            try:
                with Image.open(f) as im:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # (h, w, 3)
            except (OSError, ValueError) as exc:
                log.warning("%s: unreadable crop (%s)", f, exc)
                continue
            dims.append(rgb.shape[:2])
            pix.append(background_pixels(rgb))
        if not dims:
            continue
        found += 1
        size[i] = np.mean(dims, axis=0)
        allpix = np.concatenate(pix)  # (n, 3)
        colour[i] = np.concatenate([allpix.mean(axis=0), allpix.std(axis=0)])
    if not found:
        reason = f"no crop under {root}/<bag_id>/ for any patient: image size and colour cannot be measured"
        return [], [{"name": "image_size", "reason": reason}, {"name": "colour", "reason": reason}]
    if found < len(bag_ids):
        log.warning("%s: %d of %d patients have no crop (their image size and colour are imputed)", root,
                    len(bag_ids) - found, len(bag_ids))  # fmt: skip
    src = str(root)
    return [Signal("image_size", size.astype(object), ("num", "num"), ("crop_height", "crop_width"), src),
            Signal("colour", colour.astype(object), ("num",) * 6,
                   ("bg_mean_r", "bg_mean_g", "bg_mean_b", "bg_std_r", "bg_std_g", "bg_std_b"), src)], []  # fmt: skip


def _default_crops(cohort_path: Path, bag_ids: Sequence[str]) -> Path | None:
    """The cohort table's folder when it holds the patients' crop folders (a synthetic cohort, a crop root)."""
    root = cohort_path.parent
    return root if any((root / b).is_dir() for b in bag_ids[:20]) else None


def check_shortcuts(run: str | Path, cohort: str | Path | None = None, crops: str | Path | None = None,
                    config: ShortcutConfig | None = None, out: str | Path | None = None) -> ShortcutResult:  # fmt: skip
    """Fit every non-morphological signal alone with the run's patient-level folds; flag those that come
    close to the aggregator. Writes ``shortcuts.json`` and ``shortcuts.md``/``.html`` into ``out`` (default:
    the run folder, where the passport reads them) once everything has been computed.

    Args:
        run: a training run folder (out-of-fold ``predictions.csv`` and ``config.yaml``).
        cohort: the cohort table with site/date/metadata columns (default: the run's recorded cohort).
        crops: root of ``<bag_id>/<cell>.png`` crops (default: the cohort's folder when it holds them;
            without crops, image size and colour are skipped and named).
        config: settings.
        out: output folder (``None``: the run folder).

    Raises:
        UserError: not a training run (a prediction folder has no out-of-fold predictions), no cohort
            table, a cohort without the run's patients or its label column.
    """
    from milcore.data.cohort import read_cohort
    from milcore.data.predictions import prediction_sources, read_predictions

    config = config or ShortcutConfig()
    run = Path(run)
    table = read_predictions(run)
    src = prediction_sources(run)
    if src["kind"] != "run" or (table.folds < 0).any():
        raise UserError(f"{run}: shortcut checks need a training run's out-of-fold predictions (each patient's "
                        "fold); this is a prediction folder or an ensemble's output")  # fmt: skip
    from milcore.data.inputs import read_run_config

    cfg = (read_run_config(run) or {}).get("run") or {}
    recorded = cohort or cfg.get("cohort")
    if not recorded:
        raise UserError(f"{run / 'config.yaml'}: records no cohort table (give --cohort)")
    cohort_path = Path(recorded)
    if not cohort_path.is_file():
        raise UserError(f"{cohort_path}: cohort table not found (give --cohort)")
    task = cfg.get("task")
    if not task:
        raise UserError(f"{run / 'config.yaml'}: records no task")
    co = read_cohort(cohort_path, task, classes=table.classes, group_column=cfg.get("group_column") or "patient")
    index = {str(b): i for i, b in enumerate(co.bag_ids)}
    keep = [i for i, b in enumerate(table.bag_ids) if b in index and table.labels[i] >= 0]
    if len(keep) < len(table.bag_ids):
        lost = [table.bag_ids[i] for i in range(len(table.bag_ids)) if i not in set(keep)]
        if len(keep) < 2 * len(table.classes):
            raise UserError(f"{cohort_path}: holds {len(keep)} of the run's {len(table.bag_ids)} labelled patients "
                            f"(e.g. {', '.join(lost[:3])} missing): not the run's cohort")  # fmt: skip
        log.warning("%s: %d of the run's patients are not in the cohort table (left out), e.g. %s", cohort_path,
                    len(lost), ", ".join(lost[:3]))  # fmt: skip
    bags = [table.bag_ids[i] for i in keep]
    rows = [index[b] for b in bags]
    y = table.labels[keep]
    folds = table.folds[keep]
    columns = {c: np.asarray(v)[rows] for c, v in co.columns.items()}
    signals, skipped = cohort_signals(columns, str(cohort_path), exclude=(task, co.group_column or ""),
                                       ignore=config.ignore)
    bank_path = cfg.get("bank")
    if bank_path and Path(bank_path).exists():
        from feature_cache.bank import open_reader

        with open_reader(bank_path) as bank:
            counts = dict(zip(bank.bag_ids(), bank.bag_sizes().tolist(), strict=True))
        sizes = np.asarray([counts.get(b, np.nan) for b in bags], dtype=float)  # (B,)
        signals.append(Signal("bag_size", sizes.astype(object).reshape(-1, 1), ("num",), ("cells",), str(bank_path)))
    else:
        skipped.append({"name": "bag_size", "reason": f"the run's bank {bank_path} is not on disk"})
    root = Path(crops) if crops else _default_crops(cohort_path, bags)
    if crops and not root.is_dir():
        raise UserError(f"--crops {root}: no such folder")
    if root is None:
        reason = (f"no crops (the cohort's folder {cohort_path.parent} holds no <bag_id>/ crop folders; give "
                  "--crops ROOT): image size and colour cannot be measured")  # fmt: skip
        skipped += [{"name": "image_size", "reason": reason}, {"name": "colour", "reason": reason}]
    else:
        more, why = crop_signals(root, bags, config.max_crops, config.seed)
        signals += more
        skipped += why
    model_pred = table.predicted[keep]
    result = run_checks(signals, y, folds, model_pred, table.classes, config, skipped)
    write_shortcuts(result, Path(out) if out else run)
    return result


def write_shortcuts(result: ShortcutResult, folder: Path) -> Path:
    """Write ``shortcuts.json`` and a human report (``shortcuts.html`` / ``shortcuts.md``) into ``folder``."""
    from milcore.report.document import Report
    from milcore.report.files import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    rep = Report("Shortcut check")
    if result.flagged:
        advice = ("The model may have learnt these signals instead of the cells' morphology; check it on patients "
                  "where they do not follow the label.")
        rep.warnings("Shortcut", [result.headline(), advice])
    else:
        rep.paragraph(result.headline())
    rep.paragraph(f"Aggregator: out-of-fold balanced accuracy {result.model_balanced_accuracy:.3f} on "
                  f"{result.patients} patients (chance {result.chance:.3f}). Each signal below is fitted alone with "
                  "the run's patient-level folds (class-balanced logistic regression); flagged when its association "
                  "with the label is significant (permutation test of Pillai's trace, p below, Holm-corrected < "
                  f"{result.config.alpha}) and its balanced accuracy reaches {result.config.min_share:.0%} of the "
                  "model's gain over chance.")  # fmt: skip
    rep.table(["check", "columns", "balanced accuracy", "p", "share of model", "flagged"],
              [[c["name"], ", ".join(c["columns"]), f"{c['balanced_accuracy']:.3f}", f"{c['p_value']:.4f}",
                "-" if c["share_of_model"] is None else f"{c['share_of_model']:.2f}", "YES" if c["flagged"] else "no"]
               for c in result.checks])  # fmt: skip
    if result.skipped:
        rep.heading("Skipped")
        rep.bullets([f"{s['name']}: {s['reason']}" for s in result.skipped])
    write_json_atomic(folder / "shortcuts.json", result.to_json())
    rep.write(folder, "shortcuts")
    return folder / "shortcuts.json"
