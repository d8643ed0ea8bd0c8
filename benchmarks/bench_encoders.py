"""Benchmark: cell encoders that know blood (issue 15). One subcommand per table; each prints a Markdown
table and writes ``bench.json`` under ``--out`` (default ``benchmarks/results/encoders/<table>``).

- ``supervised``: BloodMNIST single-cell **test** accuracy of the supervised encoder (``compact_cnn``
  from scratch, trained on the official train split, early-stopped on val) beside the MedMNIST v2
  ResNet-18 (28) figure (Yang et al. 2023, *Scientific Data* 10:41, Table 3: BloodMNIST ACC 0.958) and
  the logistic probe of ImageNet ``efficientnet_lite0`` features (96 px) trained on the train split.
- ``ssl``: a SimCLR ``compact_cnn`` trained on the train split's cells without their labels, and the
  ImageNet ``efficientnet_lite0``, each probed the same way (logistic and k-NN, train -> test split).
- ``bags``: BloodMNIST bags (immature granulocytes at 5% in positive bags; train-split bags for 5-fold
  CV training of ABMIL with the real-cell recipe, test-split bags for evaluation) with ImageNet,
  supervised and SSL features: test bag AUROC and attention instance-AUROC.
- ``sites``: synthetic cohort with 3 sites (``milcore synth --sites 3``): a ``compact_cnn`` cell-type
  classifier trained on site 0, balanced accuracy on sites 1-2, without stain handling, with HED stain
  jitter, with per-bag Reinhard normalisation, and both; several seeds, paired differences with a
  t-based 95% CI.
- ``averaging``: what weight averaging (EMA) and dihedral test-time averaging bought, from a finished
  supervised run's ``state.pt`` (last-epoch raw weights vs their EMA, each with and without TTA).
- ``step``: seconds per ``compact_cnn`` training step in float32 / bfloat16 autocast, contiguous /
  channels-last, on this CPU (why bf16 + channels-last is the default on CPUs with native bf16).
- ``colour``: colour statistics of real BCCD fields vs BloodMNIST cells (RGB, CIELAB, HED, Macenko
  stain vectors), BCCD after Reinhard normalisation to the BloodMNIST target, and the speed of the
  HED jitter in torch vs scikit-image's ``rgb2hed``/``hed2rgb``.

Training runs are resumable folders under ``--work`` (default ``/tmp/milcore_bench_encoders``): a
rerun reuses finished encoders with the same recipe. Every timing is printed with the load average.

Usage:
    python benchmarks/bench_encoders.py {supervised,averaging,step,ssl,bags,sites,colour} [--work DIR] [--out DIR]
        [--quick]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_encoders")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NPZ = ROOT.parent / "shared" / "data" / "bloodmnist" / "bloodmnist.npz"
DEFAULT_BCCD = ROOT.parent / "shared" / "data" / "bccd"
MEDMNIST_RESNET18_28 = {"accuracy": 0.958, "auc": 0.998,
                        "source": "MedMNIST v2 (Yang et al. 2023, Scientific Data 10:41), Table 3, "
                                  "BloodMNIST, ResNet-18 (28)"}  # fmt: skip

#: The recipes the README's numbers come from (``--quick`` shrinks them).
SUPERVISED = {"backbone": "compact_cnn", "image_size": 28, "width": 32, "epochs": 40, "patience": 8, "ema": 0.999,
              "tta": True}
SSL = {"backbone": "compact_cnn", "image_size": 28, "width": 32, "epochs": 30, "max_cells": 0}


def _machine() -> dict[str, Any]:
    from milcore.report.bench_io import machine_info

    return machine_info()


def _recipe(base: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The recipe with the command line's overrides, and a run-folder name that tells recipes apart."""
    recipe = dict(base, **{k: v for k, v in overrides.items() if v is not None})
    changed = "".join(f"_{k}{v}" for k, v in sorted(recipe.items()) if base.get(k) != v)
    return recipe, changed


def train_supervised_encoder(npz: Path, work: Path, quick: bool, threads: int, **overrides: Any) -> Any:
    """The supervised BloodMNIST encoder (resumed or reused when ``work`` already holds it)."""
    from feature_cache.encoders.train_supervised import SupervisedConfig, train_supervised

    recipe, tag = _recipe(SUPERVISED, dict(overrides, epochs=1, max_cells=600) if quick else overrides)
    return train_supervised(SupervisedConfig(data=str(npz), out=str(work / f"bm_compact{tag}"), device="cpu",
                                             threads=threads, **recipe))  # fmt: skip


def train_ssl_encoder(npz: Path, work: Path, quick: bool, threads: int, **overrides: Any) -> Any:
    """The SimCLR BloodMNIST encoder (train split, labels unused)."""
    from feature_cache.encoders.train_ssl import SSLConfig, train_ssl

    recipe, tag = _recipe(SSL, dict(overrides, epochs=1, max_cells=300) if quick else overrides)
    return train_ssl(SSLConfig(data=str(npz), out=str(work / f"bm_simclr{tag}"), device="cpu", threads=threads,
                               **recipe))  # fmt: skip


def _sup(args: argparse.Namespace) -> Any:
    return train_supervised_encoder(args.npz, args.work, args.quick, args.threads, epochs=args.epochs,
                                    max_cells=args.max_cells, width=args.width)  # fmt: skip


def _ssl(args: argparse.Namespace) -> Any:
    return train_ssl_encoder(args.npz, args.work, args.quick, args.threads, epochs=args.ssl_epochs,
                             max_cells=args.ssl_cells, width=args.width)  # fmt: skip


def split_features(npz: Path, encoder: str, weights: Path | None, split: str, cache: Path, image_size: int = 96):
    """(features, labels, EncoderInfo) of one official split; ImageNet features via bench_bloodmnist's cache."""
    from bench_bloodmnist import encode_split

    from feature_cache.encoders import create_encoder
    from feature_cache.sources.bloodmnist import load_split

    if weights is None:
        return encode_split(npz, split, image_size, cache)
    enc = create_encoder(encoder, weights=weights, device="cpu")
    images, labels = load_split(npz, split)
    return enc.encode(images, batch_size=512), labels, enc.info


def _probe(x_train, y_train, x_test, y_test, n_boot: int) -> dict[str, Any]:
    from feature_cache.encoders.probe import ProbeConfig, probe_split
    from feature_cache.sources.bloodmnist import CELL_TYPES

    config = ProbeConfig(data="-", encoder="-", n_boot=n_boot)
    t0 = time.perf_counter()
    out = probe_split(x_train, y_train, x_test, y_test, CELL_TYPES, config)
    out["seconds"] = time.perf_counter() - t0
    return out


def _ci(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def bench_supervised(args: argparse.Namespace) -> tuple[dict, str]:
    """Supervised encoder vs MedMNIST's ResNet-18 vs the ImageNet probe on BloodMNIST's test split."""
    n_boot = 50 if args.quick else 1000
    result = _sup(args)
    card = result.card
    xs = {s: split_features(args.npz, "compact_cnn", result.weights, s, args.cache) for s in ("train", "test")}
    own_probe = _probe(xs["train"][0], xs["train"][1], xs["test"][0], xs["test"][1], n_boot)
    im = {s: split_features(args.npz, "efficientnet_lite0", None, s, args.cache) for s in ("train", "test")}
    if args.quick:
        im = {s: (v[0][:: 20], v[1][:: 20], v[2]) for s, v in im.items()}
    imagenet = _probe(im["train"][0], im["train"][1], im["test"][0], im["test"][1], n_boot)
    rows = [
        {"model": "compact_cnn supervised (this engine; own classifier head)",
         "test_accuracy": card["metrics"]["test_accuracy"],
         "test_balanced_accuracy": card["metrics"]["test_balanced_accuracy"],
         "train_seconds": card["training"]["seconds"],
         "load_average": card["training"]["load_average"], "epochs": card["training"]["epochs"],
         "best_epoch": card["metrics"]["best_epoch"]},
        {"model": "compact_cnn supervised features, logistic probe",
         "test_accuracy": own_probe["logistic"]["accuracy"]["value"],
         "test_balanced_accuracy": own_probe["logistic"]["balanced_accuracy"]["value"], "probe": own_probe},
        {"model": MEDMNIST_RESNET18_28["source"], "test_accuracy": MEDMNIST_RESNET18_28["accuracy"],
         "test_balanced_accuracy": None},
        {"model": "ImageNet efficientnet_lite0 (96 px) features, logistic probe",
         "test_accuracy": imagenet["logistic"]["accuracy"]["value"],
         "test_balanced_accuracy": imagenet["logistic"]["balanced_accuracy"]["value"], "probe": imagenet},
    ]  # fmt: skip
    out = {"benchmark": "encoders_supervised", "recipe": card["recipe"], "card_metrics": card["metrics"],
           "rows": rows, "target": {"test_accuracy": 0.95}, "quick": args.quick}  # fmt: skip
    lines = ["| model (BloodMNIST test split, 3,421 cells) | accuracy | balanced accuracy |", "|---|---:|---:|"]
    for r in rows:
        ba = "" if r["test_balanced_accuracy"] is None else f"{r['test_balanced_accuracy']:.3f}"
        lines.append(f"| {r['model']} | {r['test_accuracy']:.3f} | {ba} |")
    lines.append(f"\nTraining: {card['training']['seconds']:.0f} s, {card['training']['epochs']} epochs (best "
                 f"{card['metrics']['best_epoch']}), load average {card['training']['load_average']}")  # fmt: skip
    return out, "\n".join(lines)


def bench_ssl(args: argparse.Namespace) -> tuple[dict, str]:
    """SimCLR encoder (train split, no labels) vs ImageNet features, probed train -> test."""
    n_boot = 50 if args.quick else 1000
    result = _ssl(args)
    rows = []
    for name, enc, weights in (("SimCLR compact_cnn (train split, labels unused)", "compact_cnn", result.weights),
                               ("ImageNet efficientnet_lite0 (96 px)", "efficientnet_lite0", None)):  # fmt: skip
        xs = {s: split_features(args.npz, enc, weights, s, args.cache) for s in ("train", "test")}
        if args.quick:
            xs = {s: (v[0][:: 20], v[1][:: 20], v[2]) for s, v in xs.items()}
        probe = _probe(xs["train"][0], xs["train"][1], xs["test"][0], xs["test"][1], n_boot)
        rows.append({"encoder": name, "dim": int(xs["train"][0].shape[1]), "probe": probe})
    card = result.card
    out = {"benchmark": "encoders_ssl", "recipe": card["recipe"], "training": card["training"],
           "card_metrics": card["metrics"], "rows": rows, "quick": args.quick}  # fmt: skip
    lines = ["| encoder | D | logistic bal. acc. [95% CI] | logistic accuracy | k-NN bal. acc. [95% CI] |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        p = r["probe"]
        lines.append(f"| {r['encoder']} | {r['dim']} | {_ci(p['logistic']['balanced_accuracy'])} | "
                     f"{p['logistic']['accuracy']['value']:.3f} | {_ci(p['knn']['balanced_accuracy'])} |")  # fmt: skip
    lines.append(f"\nSimCLR training: {card['training']['seconds']:.0f} s, {card['training']['epochs']} epochs on "
                 f"{card['data']['train']} cells, load average {card['training']['load_average']}")  # fmt: skip
    return out, "\n".join(lines)


def bench_bags(args: argparse.Namespace) -> tuple[dict, str]:
    """BloodMNIST bags (immature granulocytes at 5%) with ImageNet, supervised and SSL features."""
    import tempfile

    from bench_bloodmnist import MODEL_DROPOUT, RECIPE, write_bag_bank

    from feature_cache.sources.bloodmnist import BloodMnistBags, make_bloodmnist_bags
    from milcore.crossval import train_run
    from milcore.prediction import evaluate_predictions, predict
    from milcore.training.config import RunSpec, TrainConfig

    wanted = [w.strip() for w in args.bag_encoders.split(",") if w.strip()]
    unknown = sorted(set(wanted) - {"imagenet", "supervised", "ssl"})
    if unknown:
        raise SystemExit(f"--bag-encoders: unknown {', '.join(unknown)} (choose from imagenet, supervised, ssl)")
    n_train, n_test, epochs = (20, 10, 2) if args.quick else (args.train_bags, args.test_bags, args.bag_epochs)
    encoders = []
    if "imagenet" in wanted:
        encoders.append(("ImageNet efficientnet_lite0 (96 px)", "efficientnet_lite0", None))
    if "supervised" in wanted:
        encoders.append(("supervised compact_cnn", "compact_cnn", _sup(args).weights))
    if "ssl" in wanted:
        encoders.append(("SimCLR compact_cnn", "compact_cnn", _ssl(args).weights))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = {s: make_bloodmnist_bags(args.npz, work / s, BloodMnistBags(split=s, bags=n, seed=args.seed,
                                                                                 witness_range=(0.05, 0.05)))
                   for s, n in (("train", n_train), ("test", n_test))}  # fmt: skip
        for i, (name, enc, weights) in enumerate(encoders):
            t0 = time.perf_counter()
            banks = {}
            for s in ("train", "test"):
                x, y, info = split_features(args.npz, enc, weights, s, args.cache)
                banks[s] = write_bag_bank(folders[s], x, y, info, work / f"{s}_{i}.h5")
            spec = RunSpec(str(banks["train"]), str(folders["train"] / "cohort.csv"), "left_shift", folds=args.folds,
                           seed=args.seed, n_boot=200)  # fmt: skip
            config = TrainConfig(model="abmil", epochs=epochs, seed=args.seed, model_args={"dropout": MODEL_DROPOUT},
                                 num_workers=args.num_workers, **RECIPE)  # fmt: skip
            run = work / f"run_{i}"
            cv = train_run(spec, config, run, overwrite=True).metrics
            checkpoints = sorted(p.parent for p in run.glob("fold_*/checkpoint.json"))
            predict(checkpoints, banks["test"], out=work / f"test_{i}")
            m = evaluate_predictions(work / f"test_{i}", folders["test"] / "cohort.csv", "left_shift", banks["test"])
            rows.append({"encoder": name, "fingerprint": info.fingerprint(), "cv_auroc": cv["mean"]["auroc"]["mean"],
                         "test_auroc": m["metrics"]["auroc"]["value"], "test_auroc_ci95": m["metrics"]["auroc"]["ci95"],
                         "test_balanced_accuracy": m["metrics"]["balanced_accuracy"]["value"],
                         "test_instance_auroc": m.get("instance", {}).get("instance_auroc", float("nan")),
                         "seconds": time.perf_counter() - t0})  # fmt: skip
    out = {"benchmark": "encoders_bags", "setup": {"train_bags": n_train, "test_bags": n_test, "epochs": epochs,
           "witness": "immature_granulocyte 5%", "bag_size": "50-400", "model": "abmil", "recipe": RECIPE,
           "folds": args.folds, "seed": args.seed}, "rows": rows,
           "targets": {"test_auroc": 0.95, "test_instance_auroc": 0.9}, "quick": args.quick}  # fmt: skip
    lines = ["| features | CV AUROC | test bag AUROC [95% CI] | test bal. acc. | test instance-AUROC |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lo, hi = r["test_auroc_ci95"]
        lines.append(f"| {r['encoder']} | {r['cv_auroc']:.3f} | {r['test_auroc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['test_balanced_accuracy']:.3f} | {r['test_instance_auroc']:.3f} |")  # fmt: skip
    return out, "\n".join(lines)


def synthetic_cells(patients: int, crop: int, seed: int, per_site: int):
    """Cells of a 3-site synthetic cohort: {site: (images (n, crop, crop, 3), types (n,) str, bag (n,))}."""
    from feature_cache.sources.synthetic_cohort import SyntheticCohort
    from feature_cache.sources.synthetic_config import SynthConfig

    cohort = SyntheticCohort(SynthConfig(task="aml", patients=patients, sites=3, crop_size=crop, seed=seed,
                                         bag_median=60, bag_range=(20, 200)))  # fmt: skip
    out: dict[int, list] = {0: [], 1: [], 2: []}
    for p in cohort.patients:
        pixels = cohort.render_bag(p)
        types = cohort.cells(p).cell_type
        out[p.site].append((pixels, np.asarray([str(t) for t in types]), p.patient_id))
    sites = {}
    rng = np.random.default_rng(seed)
    for site, parts in out.items():
        x = np.concatenate([a for a, _, _ in parts])
        t = np.concatenate([b for _, b, _ in parts])
        bag = np.concatenate([np.full(len(b), pid) for _, b, pid in parts])
        keep = np.sort(rng.permutation(len(x))[:per_site])
        sites[site] = (x[keep], t[keep], bag[keep])
    return sites


def _normalise_per_bag(x: np.ndarray, bags: np.ndarray) -> np.ndarray:
    from feature_cache.encoders.stain import StainNormalizer

    norm = StainNormalizer("reinhard")
    out = x.copy()
    for b in np.unique(bags):
        idx = np.nonzero(bags == b)[0]
        out[idx] = np.stack(norm(list(x[idx])))
    return out


def bench_sites(args: argparse.Namespace) -> tuple[dict, str]:
    """Unseen-site balanced accuracy of a cell classifier, with and without stain handling."""
    import tempfile

    from scipy import stats

    from feature_cache.encoders.augment import AugmentConfig
    from feature_cache.encoders.train_supervised import SupervisedConfig, train_supervised

    seeds = [0] if args.quick else list(range(args.seeds))
    patients, per_site, epochs = (12, 300, 1) if args.quick else (args.patients, args.per_site, args.site_epochs)
    conditions = {"none": (0.0, False), "hed_jitter": (0.1, False), "reinhard": (0.0, True), "both": (0.1, True)}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            t0 = time.perf_counter()
            sites = synthetic_cells(patients, 32, seed, per_site)
            types = sorted({t for t in sites[0][1]})
            gen_seconds = time.perf_counter() - t0
            for name, (hed, normalise) in conditions.items():
                x0, t_0, b0 = sites[0]
                xt = np.concatenate([sites[1][0], sites[2][0]])
                tt = np.concatenate([sites[1][1], sites[2][1]])
                bt = np.concatenate([sites[1][2], sites[2][2]])
                if normalise:
                    x0, xt = _normalise_per_bag(x0, b0), _normalise_per_bag(xt, bt)
                keep = np.isin(tt, types)
                xt, tt = xt[keep], tt[keep]
                order = np.random.default_rng(seed).permutation(len(x0))
                nval = len(x0) // 10
                va, tr = order[:nval], order[nval:]
                npz = Path(tmp) / f"s{seed}_{name}.npz"
                lab = {t: i for i, t in enumerate(types)}
                np.savez(npz, train_images=x0[tr], train_labels=np.array([lab[t] for t in t_0[tr]])[:, None],
                         val_images=x0[va], val_labels=np.array([lab[t] for t in t_0[va]])[:, None],
                         test_images=xt, test_labels=np.array([lab[t] for t in tt])[:, None])  # fmt: skip
                aug = AugmentConfig(hed_sigma=hed)
                t1 = time.perf_counter()
                res = train_supervised(SupervisedConfig(data=str(npz), out=str(Path(tmp) / f"run_{seed}_{name}"),
                                                        image_size=32, width=16, epochs=epochs, patience=0,
                                                        augment=aug, seed=seed, device="cpu",
                                                        threads=args.threads))  # fmt: skip
                m = res.card["metrics"]
                rows.append({"seed": seed, "condition": name, "hed_sigma": hed, "reinhard_per_bag": normalise,
                             "val_balanced_accuracy_site0": m["val_balanced_accuracy"],
                             "unseen_site_balanced_accuracy": m["test_balanced_accuracy"],
                             "unseen_site_accuracy": m["test_accuracy"], "train_cells": len(tr),
                             "test_cells": len(xt), "classes": len(types),
                             "seconds": time.perf_counter() - t1, "generate_seconds": gen_seconds})  # fmt: skip
    summary = {}
    base = {r["seed"]: r["unseen_site_balanced_accuracy"] for r in rows if r["condition"] == "none"}
    for name in conditions:
        vals = np.array([r["unseen_site_balanced_accuracy"] for r in rows if r["condition"] == name])
        diff = np.array([r["unseen_site_balanced_accuracy"] - base[r["seed"]] for r in rows if r["condition"] == name])
        n = len(diff)
        half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        summary[name] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if n > 1 else float("nan"),
                         "diff_vs_none": float(diff.mean()),
                         "diff_ci95": [float(diff.mean() - half), float(diff.mean() + half)]}  # fmt: skip
    out = {"benchmark": "encoders_sites", "setup": {"patients": patients, "sites": 3, "crop": 32,
           "per_site_cells": per_site,
           "train": "site 0", "test": "sites 1-2", "backbone": "compact_cnn width 16, 32 px", "epochs": epochs,
           "seeds": seeds}, "rows": rows, "summary": summary, "quick": args.quick}  # fmt: skip
    lines = ["| stain handling | unseen-site bal. acc. (mean ± sd) | difference vs none [95% CI over seeds] |",
             "|---|---:|---:|"]  # fmt: skip
    for name, s in summary.items():
        lo, hi = s["diff_ci95"]
        lines.append(f"| {name} | {s['mean']:.3f} ± {s['sd']:.3f} | {s['diff_vs_none']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return out, "\n".join(lines)


def bench_colour(args: argparse.Namespace) -> tuple[dict, str]:
    """BCCD vs BloodMNIST colour statistics; Reinhard on BCCD; HED jitter speed (torch vs scikit-image)."""
    import torch
    from PIL import Image
    from skimage.color import hed2rgb, rgb2hed

    from feature_cache.encoders.augment import Augment, AugmentConfig
    from feature_cache.encoders.stain import DEFAULT_TARGET, StainNormalizer, colour_statistics, fit_target
    from feature_cache.sources.bloodmnist import load_split

    x, y = load_split(args.npz, "train")
    idx = np.concatenate([np.nonzero(y == c)[0][:40] for c in range(8)])
    target = fit_target(x[idx])
    files = sorted((args.bccd / "JPEGImages").glob("*.jpg"))[: (10 if args.quick else 100)]
    fields = [np.asarray(Image.open(f).convert("RGB").reduce(4)) for f in files]
    stats = {"bloodmnist_train_2000": colour_statistics(x[:2000]), "bccd_fields": colour_statistics(fields)}
    norm = StainNormalizer("reinhard")
    stats["bccd_fields_reinhard_to_bloodmnist"] = colour_statistics(norm(fields))
    stats["bccd_fields_macenko_to_bloodmnist"] = colour_statistics(StainNormalizer("macenko")(fields))
    speed = {}
    for size in (28, 96):
        batch = torch.randint(0, 256, (256, 3, size, size), dtype=torch.uint8)
        aug = Augment(AugmentConfig(dihedral=False, rotate=False, scale=(1.0, 1.0), translate=0.0, blur_p=0.0,
                                    hed_sigma=0.05))  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(5):
            aug(batch)
        t_torch = (time.perf_counter() - t0) / 5
        arr = batch.permute(0, 2, 3, 1).numpy()
        t0 = time.perf_counter()
        for img in arr:
            hed = rgb2hed(img)
            hed2rgb(hed * 1.02 + 0.01)
        t_sk = time.perf_counter() - t0
        speed[str(size)] = {"torch_ms_per_batch_256": 1000 * t_torch, "skimage_ms_per_batch_256": 1000 * t_sk,
                            "speedup": t_sk / t_torch}  # fmt: skip
    out = {"benchmark": "encoders_colour", "bccd_fields": len(files), "stats": stats, "hed_jitter_speed": speed,
           "default_target_recomputed": target.describe(), "default_target": DEFAULT_TARGET.describe(),
           "quick": args.quick}  # fmt: skip
    lines = ["| data | RGB mean | CIELAB mean | CIELAB std | HED mean (x100) | stain 1 | stain 2 |",
             "|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        def f(v, k=1.0, d=1):
            return ", ".join(f"{a * k:.{d}f}" for a in v)

        lines.append(f"| {name} | {f(s['rgb_mean'])} | {f(s['lab_mean'])} | {f(s['lab_std'])} | "
                     f"{f(s['hed_mean'], 100, 2)} | {f(s['stains'][0], d=2)} | {f(s['stains'][1], d=2)} |")  # fmt: skip
    lines += ["", "| crop side | HED jitter, torch (ms / 256 crops) | scikit-image rgb2hed+hed2rgb (ms / 256) | "
              "speed-up |",
              "|---:|---:|---:|---:|"]  # fmt: skip
    for size, s in speed.items():
        lines.append(f"| {size} | {s['torch_ms_per_batch_256']:.1f} | {s['skimage_ms_per_batch_256']:.1f} | "
                     f"{s['speedup']:.1f}x |")  # fmt: skip
    return out, "\n".join(lines)


def bench_step(args: argparse.Namespace) -> tuple[dict, str]:
    """Seconds per training step of ``compact_cnn`` (batch 128, 28 px) in float32 and bfloat16 autocast, contiguous
    and channels-last, on this CPU with ``--threads`` threads (the choice :func:`precision_for` makes)."""
    import torch

    from feature_cache.devices import native_bf16
    from feature_cache.encoders.compact import build

    torch.set_num_threads(args.threads)
    width = args.width or SUPERVISED["width"]
    x, y = torch.rand(128, 3, 28, 28), torch.randint(0, 8, (128,))
    rows = []
    for bf16 in (False, True):
        for channels_last in (False, True):
            torch.manual_seed(0)
            net, _ = build(width)
            head = torch.nn.Linear(net.dim, 8)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            net, xb = net.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            opt = torch.optim.AdamW([*net.parameters(), *head.parameters()])
            times = []
            for _ in range(2 if args.quick else 8):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(head(net(xb)).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            rows.append({"bf16": bf16, "channels_last": channels_last, "median_step_s": float(np.median(times[1:]))})
    base = rows[0]["median_step_s"]
    out = {"benchmark": "encoders_step", "width": width, "batch": 128, "image_size": 28, "threads": args.threads,
           "native_bf16_cpu": native_bf16("cpu"), "rows": rows, "quick": args.quick}  # fmt: skip
    lines = ["| autocast | memory format | s / step | speed-up vs float32 |", "|---|---|---:|---:|"]
    for r in rows:
        fmt = "channels-last" if r["channels_last"] else "contiguous"
        lines.append(f"| {'bf16' if r['bf16'] else 'float32'} | {fmt} | {r['median_step_s']:.3f} | "
                     f"{base / r['median_step_s']:.2f}x |")  # fmt: skip
    return out, "\n".join(lines)


def bench_averaging(args: argparse.Namespace) -> tuple[dict, str]:
    """What weight averaging and test-time averaging bought: a finished supervised run's last-epoch raw
    weights and its EMA (both in ``state.pt``), each with and without dihedral TTA, on val and test."""
    import torch

    from feature_cache.encoders.backbones import build_backbone
    from feature_cache.encoders.card import read_card
    from feature_cache.encoders.compact import DihedralMean
    from feature_cache.encoders.train_supervised import classify_metrics
    from feature_cache.sources.bloodmnist import load_split

    run = args.run or args.work / "bm_compact"
    card = read_card(run / "encoder.safetensors") or {}
    opts = card.get("options", {})
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    sets = {"raw": (state["modules"]["model"], state["modules"]["head"])}
    if "ema" in state["modules"]:
        ema = state["modules"]["ema"]
        sets["ema"] = tuple({k[len(pre) :]: v for k, v in ema.items() if k.startswith(pre)}
                            for pre in ("module.0.", "module.1."))  # fmt: skip
    data = {s: load_split(args.npz, s) for s in ("val", "test")}
    rows = []
    for name, (body, head_state) in sets.items():
        bb = build_backbone("compact_cnn", int(opts.get("image_size", 28)), int(opts.get("width", 32)))
        model, head = torch.nn.Sequential(bb.norm, bb.net), torch.nn.Linear(bb.dim, len(card["classes"]))
        model.load_state_dict(body)
        head.load_state_dict(head_state)
        for tta in (False, True):
            net = torch.nn.Sequential(model[0], DihedralMean(model[1]) if tta else model[1], head).eval()
            row: dict[str, Any] = {"weights": name, "tta": tta}
            for split, (x, y) in data.items():
                xt = torch.as_tensor(np.asarray(x)).permute(0, 3, 1, 2).float()  # BloodMNIST: already 28 px
                with torch.inference_mode():
                    prob = torch.cat([torch.softmax(net(xt[i : i + 512]), 1) for i in range(0, len(xt), 512)]).numpy()
                m = classify_metrics(y, prob, len(card["classes"]))
                row.update({f"{split}_accuracy": m["accuracy"], f"{split}_balanced_accuracy": m["balanced_accuracy"]})
            rows.append(row)
    out = {"benchmark": "encoders_averaging", "run": str(run), "epoch": state["loop"]["epoch"],
           "recipe": card.get("recipe"), "rows": rows}  # fmt: skip
    lines = ["| weights (last epoch) | dihedral TTA | val accuracy | test accuracy | test balanced accuracy |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['weights']} | {'yes' if r['tta'] else 'no'} | {r['val_accuracy']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['test_balanced_accuracy']:.4f} |")  # fmt: skip
    return out, "\n".join(lines)


TABLES = {"supervised": bench_supervised, "averaging": bench_averaging, "step": bench_step, "ssl": bench_ssl,
          "bags": bench_bags, "sites": bench_sites, "colour": bench_colour}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: one table per subcommand."""
    import os
    import sys

    from milcore.report.bench_io import save_bench

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_bloodmnist
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--bccd", type=Path, default=DEFAULT_BCCD)
    parser.add_argument("--work", type=Path, default=Path("/tmp/milcore_bench_encoders"),
                        help="resumable training runs and the encoded-split cache")
    parser.add_argument("--cache", type=Path, default=None, help="ImageNet features cache (default WORK/cache)")
    parser.add_argument("--epochs", type=int, default=None, help="supervised epochs (default: the recipe's)")
    parser.add_argument("--max-cells", type=int, default=None, help="supervised training cells (default all)")
    parser.add_argument("--width", type=int, default=None, help="compact_cnn width (default: the recipe's, 32)")
    parser.add_argument("--ssl-epochs", type=int, default=None, help="SimCLR epochs (default: the recipe's)")
    parser.add_argument("--ssl-cells", type=int, default=None, help="SimCLR training cells (default: the recipe's)")
    parser.add_argument("--bag-epochs", type=int, default=40, help="ABMIL epochs per fold (bags)")
    parser.add_argument("--bag-encoders", default="imagenet,supervised,ssl",
                        help="comma-separated features to compare (bags): imagenet, supervised, ssl")
    parser.add_argument("--patients", type=int, default=120, help="synthetic patients (sites)")
    parser.add_argument("--per-site", type=int, default=2000, help="cells drawn per site (sites)")
    parser.add_argument("--site-epochs", type=int, default=6, help="classifier epochs (sites)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (bags)")
    parser.add_argument("--num-workers", type=int, default=2, help="bag loader workers (bags)")
    parser.add_argument("--train-bags", type=int, default=400)
    parser.add_argument("--test-bags", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=None, help="finished supervised run folder (averaging; default "
                        "WORK/bm_compact)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.npz.exists():
        log.warning("skipped: BloodMNIST not found at %s (../shared/data is absent)", args.npz)
        return 0
    args.cache = args.cache or args.work / "cache"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = list(os.getloadavg())
    result, table = TABLES[args.table](args)
    result.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=_machine(),
                  wall_seconds=time.perf_counter() - t0, load_average_start=load_before,
                  load_average_end=list(os.getloadavg()))  # fmt: skip
    out = args.out or ROOT / "benchmarks" / "results" / "encoders" / (args.table + ("_quick" if args.quick else ""))
    save_bench(out, result, table + f"\n\nWall time {result['wall_seconds']:.0f} s; load average {load_before} -> "
               f"{result['load_average_end']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
