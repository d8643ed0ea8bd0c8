"""Equal tuning budgets: nested patient-level cross-validation with Optuna (``milcore bench aggregators --tune N``).

For every model (ours and the torchmil peers alike), seed and *outer* fold of the benchmark:

1. the outer fold's test bags are set aside: tuning sees only its training and validation bags;
2. those bags are split into ``inner_folds`` patient-level folds (:func:`~milcore.data.splits.make_folds`,
   seeded by the outer seed and fold), each with its own training, validation and test part;
3. Optuna runs ``trials`` trials (TPE sampler, seeded likewise). The first trial is the model's own
   defaults; each trial trains every inner fold through :func:`~milcore.training.fold.fit_fold` (early
   stopping and temperature on the inner validation part) and scores the inner test parts' pooled
   out-of-fold predictions with ``metric``. A median pruner may stop a trial after an inner fold;
4. the best trial's settings -- the defaults unless a trial beat them in the inner CV by at least
   ``min_gain`` and by at least ``min_gain_se`` standard errors of that gain (a paired bootstrap of the two
   trials' pooled out-of-fold predictions, :func:`~milcore.metrics.intervals.bootstrap_gain`), so that
   selection noise alone does not replace them, and (``confirm``, off by default) by as much again when it and
   the defaults are trained once more on fresh inner folds (:func:`_confirm`) -- train the *tuned* model on the
   outer fold exactly as the default one is trained, and it is scored on the outer test bags, beside the
   default row.

Why the standard-error rule: the best of 20 trials beats the defaults by chance alone whenever the inner CV
is noisy (a few dozen patients), and such a win often does not hold outside (the benchmarks README's tuning
section counts, per outer fold, how often it did). A fixed margin
cannot tell a cohort where the models learn from one where they are at chance; the bootstrap standard
error of the gain measures the noise of this very inner CV (the one-standard-error rule of Breiman et al.,
"Classification and Regression Trees", 1984, applied to the choice between the defaults and the winner).
Why the confirmation: the winner's gain is the largest of ``trials`` noisy gains, biased upwards by the
selection itself (the winner's curse; Cawley & Talbot, "On Over-fitting in Model Selection and Subsequent
Selection Bias in Performance Evaluation", JMLR 2010), so the rule is applied once more to a gain measured on
draws -- another patient split of the same tuning bags and another training seed -- that played no part in
choosing it. It costs ``2 x inner_folds`` fits, only where a trial passed the first check. It is an option,
not the default: on the demo cohort the winners it confirmed (fresh gains up to +0.137 inner AUROC) lowered
the outer AUROC in 4 of 6 folds, and it lowered the tuned results' means on both cohorts measured
(``benchmarks/README.md``, "Confirmation on fresh inner folds"): the inner CV's patients, not only its
selection, differ from the outer fold's.

Every model gets the same number of trials over the shared dimensions (:data:`SHARED_SPACE`: learning
rate, weight decay, dropout where the model has it, instance dropout) plus its own declared space
(``search_space`` on the aggregator class, :mod:`milcore.models.search`). ``TuneSpec.search`` narrows
or fixes dimensions; a key or value outside the declared spaces is a one-line error naming it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_cache.errors import InvalidArgumentError
from milcore.models.search import SearchDim, check_search_value, search_space

if TYPE_CHECKING:
    from collections.abc import Iterator

    from milcore.bench.aggregators import Task
    from milcore.bench.config import BenchSpec, TuneSpec
    from milcore.training.config import TrainConfig

log = logging.getLogger(__name__)

#: Dimensions every model is tuned over (``dropout`` only where the aggregator's config has that field).
SHARED_SPACE: dict[str, SearchDim] = {
    "lr": SearchDim(1e-4, 3e-3, log=True),
    "weight_decay": SearchDim(1e-6, 1e-2, log=True),
    "dropout": SearchDim(0.0, 0.5),
    "instance_dropout": SearchDim(0.0, 0.6),
}
#: Added to the inner split's seed and to the training seed for the confirmation of a winning trial
#: (:func:`_confirm`): any fixed offset gives draws the winner was not selected on.
CONFIRM_SEED = 7919
#: Shared dimensions that are training options (:class:`~milcore.training.config.TrainConfig` fields); the
#: others are aggregator config fields (``model_args``).
TRAIN_FIELDS = ("lr", "weight_decay", "instance_dropout")


def _config_fields(name: str) -> set[str]:
    from milcore.models import get_aggregator_entry

    return {f.name for f in fields(get_aggregator_entry(name).config_class)}


def full_space(name: str, peer: bool) -> dict[str, SearchDim]:
    """The space a model is tuned over before restrictions: the shared dimensions it has, then its own.

    A torchmil peer has the shared training dimensions only (its adapter takes no options).
    """
    if peer:
        return {k: d for k, d in SHARED_SPACE.items() if k in TRAIN_FIELDS}
    own = search_space(name)
    shared = {k: d for k, d in SHARED_SPACE.items() if k in TRAIN_FIELDS or k in _config_fields(name)}
    return {**shared, **own}


def default_values(name: str, peer: bool, train: TrainConfig) -> dict[str, Any]:
    """The values the default (untuned) model uses for every dimension of :func:`full_space`."""
    values: dict[str, Any] = {k: getattr(train, k) for k in TRAIN_FIELDS}
    if peer:
        return values
    from milcore.models import get_aggregator_entry

    config_defaults = get_aggregator_entry(name).config_class.defaults()
    for key in full_space(name, peer):
        if key not in TRAIN_FIELDS:
            values[key] = train.model_args.get(key, config_defaults.get(key))
    return values


def apply_params(config: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """``config`` with the tuned ``params``: training options set, the rest added to ``model_args``."""
    train = {k: v for k, v in params.items() if k in TRAIN_FIELDS}
    model = {k: v for k, v in params.items() if k not in TRAIN_FIELDS}
    return replace(config, **train, model_args={**config.model_args, **model})


def _value(text: str) -> Any:
    """``true``/``false``, an int, a float, else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_restriction(key: str, text: str, declared: SearchDim, owner: str) -> SearchDim:
    """``"value"`` (fixed), ``"low:high"`` (narrowed range) or ``"a,b,c"`` (fewer choices) -> a ``SearchDim``
    inside ``declared``.

    Raises:
        InvalidArgumentError: naming ``owner`` and ``key``: a value outside the declared dimension.
    """

    def check(value: Any) -> Any:
        if not declared.contains(value):
            raise InvalidArgumentError(f"--search {owner}{key}={text}: {value!r} is outside the declared search "
                                       f"space {declared.describe()}")  # fmt: skip
        return value

    if ":" in text and declared.choices is None:
        lo, hi = (check(_value(t)) for t in text.split(":", 1))
        if not lo < hi:
            raise InvalidArgumentError(f"--search {owner}{key}={text}: low must be < high")
        if declared.kind == "int":
            return SearchDim(int(lo), int(hi), log=declared.log)
        return SearchDim(float(lo), float(hi), log=declared.log)
    values = tuple(dict.fromkeys(check(_value(t)) for t in text.split(",")))
    if declared.kind == "int":
        values = tuple(int(v) for v in values)
    return SearchDim(choices=values)


def _split_key(raw: str) -> tuple[str | None, str]:
    model, _, key = raw.rpartition(".")
    return (model or None), key


def check_tune_spec(spec: BenchSpec) -> None:
    """Check every ``spec.tune.search`` entry before any work.

    Raises:
        InvalidArgumentError: one line naming the option: a model that is not benchmarked, a key that is
            neither a shared dimension nor in the model's declared space, or a value outside it.
    """
    models = set(spec.models) | set(spec.peers)
    for raw, text in spec.tune.search.items():
        model, key = _split_key(raw)
        if model is not None and model not in models:
            raise InvalidArgumentError(f"--search {raw}={text}: {model!r} is not benchmarked "
                                       f"(models: {', '.join(sorted(models))})")  # fmt: skip
        if key in SHARED_SPACE:
            parse_restriction(key, text, SHARED_SPACE[key], f"{model}." if model else "")
            continue
        if model is None:
            raise InvalidArgumentError(f"--search {raw}={text}: {key!r} is not a shared dimension "
                                       f"({', '.join(SHARED_SPACE)}); name the model: MODEL.{key}=...")  # fmt: skip
        if model not in spec.models:
            raise InvalidArgumentError(f"--search {raw}={text}: torchmil's {model} is tuned over the shared "
                                       f"dimensions only ({', '.join(TRAIN_FIELDS)})")  # fmt: skip
        declared = search_space(model)
        if key not in declared:
            check_search_value(model, key, None)  # the registry's one line: no such dimension, declared ones
        parse_restriction(key, text, declared[key], f"{model}.")


def _cover(dim: SearchDim, value: Any) -> SearchDim:
    """``dim`` widened to hold ``value`` (a numeric range only; choices are declared as they are)."""
    if dim.choices is not None or dim.contains(value) or isinstance(value, bool):
        return dim
    if not isinstance(value, (int, float)) or not math.isfinite(value) or (dim.log and value <= 0):
        return dim
    if dim.kind == "int" and float(value) != int(value):
        return dim
    low, high = min(dim.low, value), max(dim.high, value)
    return SearchDim(int(low), int(high), log=dim.log) if dim.kind == "int" else SearchDim(float(low), float(high),
                                                                                          log=dim.log)  # fmt: skip


def model_space(name: str, peer: bool, search: dict[str, str], defaults: dict[str, Any] | None = None
                ) -> dict[str, SearchDim]:  # fmt: skip
    """:func:`full_space` narrowed by ``search`` (entries for all models first, then the model's own).

    ``defaults`` (the values the default run trains with): each numeric range is first widened to hold
    its default, so that trial 1 can be the default run itself (a ``--lr`` outside the shared range, say);
    a ``search`` restriction then applies as given.
    """
    space = full_space(name, peer)
    if defaults:
        space = {k: _cover(d, defaults.get(k)) for k, d in space.items()}
    for raw, text in sorted(search.items(), key=lambda kv: "." in kv[0]):
        model, key = _split_key(raw)
        if (model is None or model == name) and key in space:
            space[key] = parse_restriction(key, text, space[key], f"{model}." if model else "")
    return space


def _draw(trial: Any, space: dict[str, SearchDim]) -> dict[str, Any]:
    """The trial's value of every dimension (the first trial's are the enqueued defaults where they lie in
    the space, and drawn where a restriction excludes them)."""
    return {k: d.suggest(trial, k) for k, d in space.items()}


def inner_folds(task: Task, fold: Any, ctx: dict[str, Any], salt: int = 0) -> list[Any]:
    """Patient-level folds of the outer fold's training + validation bags (never its test bags); ``salt``
    (added to the split's seed) gives another split of the same bags."""
    from milcore.data.splits import make_folds

    pool = list(fold.train) + list(fold.val)
    labels = np.asarray([ctx["label_of"][b] for b in pool])
    groups = np.asarray([ctx["group_of"][b] for b in pool], dtype=object)
    k = ctx["spec"].tune.inner_folds
    seed = 1000 * task.seed + fold.index + salt
    folds = make_folds(pool, labels, k=k, seed=seed, groups=groups, classes=ctx["classes"])
    seen = {b for f in folds for part in (f.train, f.val, f.test) for b in part}
    leaked = seen & set(fold.test)
    if leaked:  # make_folds only sees the pool, so this cannot happen; tuning must never see a test bag
        raise RuntimeError(f"tuning would see {len(leaked)} outer test bag(s)")
    return folds


def tune_task(task: Task, fold: Any, ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the Optuna search of ``task`` on its outer ``fold``; returns the chosen settings and a record.

    Returns:
        ``(params, record)``: the best trial's values for every dimension, and what the search did
        (trials complete / pruned / failed, best and default scores, whether the defaults won, fits).
    """
    import optuna

    from milcore.bench.aggregators import task_setup
    from milcore.metrics import get_metric, higher_is_better

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec: BenchSpec = ctx["spec"]
    tune = spec.tune
    defaults = default_values(task.model, task.peer, spec.train)
    space = model_space(task.model, task.peer, tune.search, defaults)
    folds = inner_folds(task, fold, ctx)
    metric = get_metric(tune.metric)
    maximise = higher_is_better(tune.metric)
    seed = 1000 * task.seed + fold.index
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0) if tune.prune
              else optuna.pruners.NopPruner())  # fmt: skip
    study = optuna.create_study(direction="maximize" if maximise else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)  # fmt: skip
    study.enqueue_trial({k: v for k, v in defaults.items() if k in space and space[k].contains(v)},
                        user_attrs={"default": True})  # fmt: skip
    fits = [0]
    oof: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # trial number -> pooled inner (labels, probabilities)
    label = task.label(spec.folds)

    def objective(trial: Any) -> float:
        params = _draw(trial, space)
        config, model = task_setup(task, ctx, params)
        value = math.nan
        desc = f"{label} trial {trial.number + 1}/{tune.trials}"
        for step, pooled in enumerate(_fit_inner(config, model, folds, ctx, desc, fits)):
            value = float(metric.fn(*pooled, 10))
            if math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        oof[trial.number] = pooled
        return value

    study.optimize(objective, n_trials=tune.trials, catch=(Exception,))
    states = [t.state for t in study.trials]
    in_space = all(d.contains(defaults[k]) for k, d in space.items())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]  # fmt: skip
    default_trial = study.trials[0]
    default_value = default_trial.value if default_trial.state == optuna.trial.TrialState.COMPLETE else None
    gain = gain_se = threshold = None
    confirmation: dict[str, Any] = {"confirmed": None, "confirm_gain": None, "confirm_gain_se": None,
                                    "confirm_gain_needed": None, "confirm_error": None}  # fmt: skip
    if complete:  # the best score; among equal scores the earliest trial (the defaults first)
        best = max(complete, key=lambda t: (t.value if maximise else -t.value, -t.number))
        default_ok = default_trial in complete and in_space
        if best.number != default_trial.number and default_ok:  # replace the defaults only when clearly better
            gain, gain_se, threshold = _gain_over_defaults(oof[default_trial.number], oof[best.number], tune, seed)
            if gain >= threshold and tune.confirm:
                confirmation.update(_confirm(task, fold, ctx, (default_trial.params, best.params), seed, fits))
            if not gain >= threshold or confirmation["confirmed"] is False:
                best = default_trial
        chosen = dict(best.params)
    else:  # every trial failed: keep the defaults (their failure will show in the outer fit)
        best, chosen = default_trial, {k: defaults[k] for k in space}
    record = {
        "trials": len(study.trials), "complete": len(complete),
        "pruned": sum(s == optuna.trial.TrialState.PRUNED for s in states),
        "failed": sum(s == optuna.trial.TrialState.FAIL for s in states), "best_trial": best.number,
        "best_value": best.value, "default_value": default_value if in_space else None,
        "chose_default": best.number == 0 and in_space, "defaults_in_space": in_space,
        "inner_folds": len(folds), "metric": tune.metric, "fits": fits[0], "best_gain": gain, "best_gain_se": gain_se,
        "gain_needed": threshold, **confirmation,
        "space": {k: d.describe() for k, d in space.items()},
    }  # fmt: skip
    log.info("%s: tuned over %d trials (%d pruned): %s %.3f (defaults %s), %s%s%s", label, record["trials"],
             record["pruned"], tune.metric, best.value if best.value is not None else math.nan,
             "n/a" if default_value is None else f"{default_value:.3f}",
             "kept the defaults" if record["chose_default"] else f"trial {best.number + 1}",
             "" if gain is None else f" (best trial's gain {gain:+.3f} ± {gain_se:.3f} s.e., {threshold:.3f} "
                                     "needed)",
             "" if confirmation["confirm_gain"] is None else
             f"; on fresh inner folds {confirmation['confirm_gain']:+.3f} ± {confirmation['confirm_gain_se']:.3f}, "
             f"{confirmation['confirm_gain_needed']:.3f} needed")  # fmt: skip
    return chosen, record


def _confirm(task: Task, fold: Any, ctx: dict[str, Any], params: tuple[dict[str, Any], dict[str, Any]], seed: int,
             fits: list[int]) -> dict[str, Any]:  # fmt: skip
    """Train the defaults and the winning trial (``params``) again on fresh inner folds and weigh the gain.

    The folds are another patient-level split of the same tuning bags (:func:`inner_folds` salted with
    :data:`CONFIRM_SEED`) and both fits use the training seed plus :data:`CONFIRM_SEED`, the same for the two,
    so the gain is paired and measured on draws the winner was not selected on. ``fits`` is incremented per fit.

    Returns:
        ``{"confirmed", "confirm_gain", "confirm_gain_se", "confirm_gain_needed", "confirm_error"}``:
        ``confirmed`` is whether the fresh gain reaches the gain needed (:func:`_gain_over_defaults`); a fit
        that fails leaves the defaults in place, with the error recorded.
    """
    from milcore.bench.aggregators import task_setup

    spec: BenchSpec = ctx["spec"]
    folds = inner_folds(task, fold, ctx, salt=CONFIRM_SEED)
    label = task.label(spec.folds)
    pooled = []
    try:
        for name, values in zip(("defaults", "best trial"), params, strict=True):
            config, model = task_setup(task, ctx, values)
            config = replace(config, seed=config.seed + CONFIRM_SEED)
            *_, every_fold = _fit_inner(config, model, folds, ctx, f"{label} confirming the {name}", fits)
            pooled.append(every_fold)  # the pooled predictions of all inner folds
    except Exception as exc:  # as a failed trial: the defaults stay, the error is recorded
        log.warning("%s: the confirmation of the best trial failed (%s): kept the defaults", label, exc)
        return {"confirmed": False, "confirm_error": f"{type(exc).__name__}: {exc}"}
    gain, se, needed = _gain_over_defaults(pooled[0], pooled[1], spec.tune, seed + CONFIRM_SEED)
    return {"confirmed": bool(gain >= needed), "confirm_gain": gain, "confirm_gain_se": se,
            "confirm_gain_needed": needed}  # fmt: skip


def _fit_inner(config: TrainConfig, model: Any, folds: list[Any], ctx: dict[str, Any], desc: str, fits: list[int]
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Train ``config`` on each inner fold in turn (``fits`` incremented per fit); after each, yield the pooled
    out-of-fold ``(labels (n,), proba (n, C))`` of the folds trained so far."""
    from milcore.training.fold import fit_fold

    labels, probs = [], []
    for step, inner in enumerate(folds):
        result = fit_fold(config, ctx["store"], inner, model=model, desc=f"{desc} inner {step + 1}/{len(folds)}",
                          attention=False)  # fmt: skip
        fits[0] += 1
        labels.append(result.labels)
        probs.append(result.proba)
        yield np.concatenate(labels), np.concatenate(probs)


def _gain_over_defaults(default: tuple[np.ndarray, np.ndarray], best: tuple[np.ndarray, np.ndarray],
                        tune: TuneSpec, seed: int) -> tuple[float, float, float]:  # fmt: skip
    """The best trial's inner-CV gain over the defaults, its bootstrap standard error and the gain it needed.

    ``default`` and ``best`` are the two trials' pooled inner out-of-fold ``(labels (n,), proba (n, C))``
    of the same inner folds. The gain needed is ``max(min_gain, min_gain_se * se)``; an undefined standard
    error (the metric undefined in most resamples) makes it infinite: a gain that cannot be measured does not
    replace the defaults.
    """
    from milcore.metrics.intervals import bootstrap_gain

    (y_default, p_default), (y_best, p_best) = default, best
    if not np.array_equal(y_default, y_best):  # the same inner folds in the same order: cannot differ
        raise RuntimeError("tuning: two trials scored different inner patients")
    boot = bootstrap_gain(tune.metric, y_default, p_default, p_best, n_boot=1000, seed=seed)
    se = boot["se"]
    if tune.min_gain_se <= 0:
        needed = tune.min_gain
    else:
        needed = max(tune.min_gain, tune.min_gain_se * se) if math.isfinite(se) else math.inf
    return boot["gain"], se, needed


def tuning_budget(spec: BenchSpec) -> dict[str, Any]:
    """What every model's tuning was allowed (``bench.json["tuning"]["budget"]``, the report's budget line)."""
    tune = spec.tune
    def described(m: str, peer: bool) -> dict[str, str]:
        space = model_space(m, peer, tune.search, default_values(m, peer, spec.train))
        return {k: d.describe() for k, d in space.items()}

    spaces = {m: described(m, False) for m in spec.models}
    spaces.update({f"torchmil:{m}": described(m, True) for m in spec.peers})
    return {"trials": tune.trials, "inner_folds": tune.inner_folds, "metric": tune.metric,
            "sampler": "TPE, seeded per seed and outer fold; trial 1 = the model's defaults",
            "pruner": "median after each inner fold (from trial 6)" if tune.prune else "none",
            "max_fits_per_model_and_fold": (tune.trials + 2 * tune.confirm) * tune.inner_folds + 1,
            "min_gain": tune.min_gain, "min_gain_se": tune.min_gain_se, "confirm": tune.confirm,
            "outer_folds": spec.folds, "seeds": list(spec.seeds), "shared": {k: d.describe() for k, d in
                                                                            SHARED_SPACE.items()},
            "spaces": spaces, "search": dict(tune.search)}  # fmt: skip


def compare_tuning(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("balanced_accuracy", "auroc")
                   ) -> dict[str, Any]:  # fmt: skip
    """Tuned vs default per model, paired over (seed, outer fold): means, the difference and its 95% CI.

    ``below`` is True when the tuned mean is below the default mean (the target says it should not be);
    ``kept_defaults`` counts the outer folds where the search kept the model's defaults.
    """
    from milcore.metrics import mean_ci

    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    out: dict[str, Any] = {}
    for impl, model in dict.fromkeys((r["impl"], r["model"]) for r in ok):
        by = {v: {(r["seed"], r["fold"]): r for r in ok if (r["impl"], r["model"], r.get("variant", "default"))
                  == (impl, model, v)} for v in ("default", "tuned")}  # fmt: skip
        pairs = sorted(set(by["default"]) & set(by["tuned"]))
        if not pairs:
            continue
        entry: dict[str, Any] = {"impl": impl, "model": model, "pairs": len(pairs),
                                 "kept_defaults": sum(bool(by["tuned"][p]["tuning"]["chose_default"]) for p in pairs)}
        for m in metrics:
            d = np.asarray([by["default"][p][m] for p in pairs], dtype=float)
            t = np.asarray([by["tuned"][p][m] for p in pairs], dtype=float)
            lo, hi = mean_ci(t - d, method="bootstrap")["ci95"]
            entry[m] = {"default": float(np.nanmean(d)), "tuned": float(np.nanmean(t)),
                        "difference": float(np.nanmean(t - d)), "difference_ci95": [lo, hi],
                        "below": bool(np.nanmean(t) < np.nanmean(d))}  # fmt: skip
        out[f"{impl}:{model}"] = entry
    return out
