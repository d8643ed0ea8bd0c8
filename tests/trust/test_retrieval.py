"""Similar-case retrieval: search backends, the run index, held-out queries, refusals, explain --similar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.cli import main
from milcore.trust.search import ExactSearch, FaissSearch, make_search


# ----------------------------------------------------------------------------- search backends
def _brute(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


def test_exact_and_faiss_flat_find_the_true_neighbours() -> None:
    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(500, 16)), rng.normal(size=(20, 16))
    truth = _brute(x, q, 5)
    sims, idx = ExactSearch(x).search(q, 5)
    assert np.array_equal(idx, truth) and np.all(np.diff(sims, axis=1) <= 1e-6)
    pytest.importorskip("faiss")  # the 'search' extra
    _, fidx = FaissSearch(x).search(q, 5)
    assert np.array_equal(fidx, truth)


def test_faiss_ivf_recall_on_clustered_vectors() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 32)) * 4
    x = centres[rng.integers(0, 40, 20_000)] + rng.normal(size=(20_000, 32))
    q = centres[rng.integers(0, 40, 50)] + rng.normal(size=(50, 32))
    search = make_search(x, "faiss-ivf")
    assert search.backend == "faiss-ivf" and search.nlist > 1
    _, idx = search.search(q, 10)
    truth = _brute(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, truth, strict=True)])
    assert recall >= 0.9


def test_fewer_vectors_than_k_are_padded_and_auto_is_exact() -> None:
    x = np.eye(3, 4)
    search = make_search(x)
    assert search.backend == "exact"
    sims, idx = search.search(np.eye(1, 4), 5)
    assert idx[0, 0] == 0 and list(idx[0, 3:]) == [-1, -1] and np.isneginf(sims[0, 3:]).all()
    with pytest.raises(InvalidArgumentError, match="search backend"):
        make_search(x, "annoy")


def test_auto_searches_a_million_vectors_exactly() -> None:
    """The index is searched anew at every load: training IVF cells costs minutes where an exact query of a
    million vectors costs a fraction of a second (benchmarks/README.md, 'Trust layer'), so auto stays exact."""
    search = make_search(np.random.default_rng(0).normal(size=(1_000_000, 2)).astype(np.float32))
    assert search.backend == "exact"


# ----------------------------------------------------------------------------- the index
@pytest.fixture(scope="module")
def index_and_models(dropout_run: Path):
    from milcore.trust.retrieval import build_index, run_models

    return build_index(dropout_run, device="cpu"), run_models(dropout_run, "cpu")


def test_index_holds_each_fold_models_training_bags(index_and_models, dropout_run: Path, tmp_path: Path) -> None:
    from milcore.trust.retrieval import CaseIndex

    index, models = index_and_models
    for fm in models.folds:
        members = [index.patients[i] for i in index.members[fm.fold]]
        assert members == fm.train
        assert np.allclose(np.linalg.norm(index.embeddings[fm.fold], axis=1), 1, atol=1e-5)
    assert set(index.patients) == {b for fm in models.folds for b in fm.train}
    counts = np.bincount(index.cell_owner, minlength=len(index))
    assert counts.max() <= 8 and counts.min() >= 1
    assert index.encoder["fingerprint"] == models.encoder["fingerprint"]
    index.save(tmp_path / "index.h5")
    again = CaseIndex.load(tmp_path / "index.h5")
    assert again.patients == index.patients and again.checksums == index.checksums
    assert np.allclose(again.embeddings[0], index.embeddings[0])
    assert np.allclose(again.cell_features, index.cell_features, atol=1e-3)  # stored as float16


def test_held_out_queries_never_see_themselves(index_and_models, planted: dict, dropout_run: Path) -> None:
    from milcore.data.predictions import read_predictions
    from milcore.data.store import open_bags
    from milcore.trust.retrieval import similar_cases

    index, models = index_and_models
    table = read_predictions(dropout_run)
    held = dict(zip(table.bag_ids, table.folds.tolist(), strict=True))
    data = open_bags(planted["bank"], planted["cohort"], "dx")
    train_of = {fm.fold: set(fm.train) for fm in models.folds}
    matches = similar_cases(index, models, data, k=3, held_out=held)
    for m in matches:
        assert m.folds == [held[m.bag_id]]
        assert len(m.cases) == 3 and m.bag_id not in {c.bag_id for c in m.cases}
        assert {c.bag_id for c in m.cases} <= train_of[held[m.bag_id]]
        sims = [c.similarity for c in m.cases]
        assert sims == sorted(sims, reverse=True)
        for cell in m.cells:
            assert {x["bag_id"] for x in cell.matches} <= train_of[held[m.bag_id]]
    free = similar_cases(index, models, data.view([index.patients[0]]), k=2)  # a training patient, not held out
    assert free[0].cases[0].bag_id == index.patients[0] and free[0].cases[0].similarity > 0.999


def test_majority_vote_breaks_ties_by_similarity() -> None:
    from milcore.trust.retrieval import CaseMatches, SimilarCase

    cases = [SimilarCase("a", "AML", 0.9, 1, []), SimilarCase("b", "control", 0.95, 1, []),
             SimilarCase("c", "control", 0.5, 1, []), SimilarCase("d", "AML", 0.8, 1, [])]  # fmt: skip
    assert CaseMatches("q", cases, [], [0]).majority() == "AML"  # 2 votes each; 1.70 > 1.45
    assert CaseMatches("q", cases[:3], [], [0]).majority() == "control"
    assert CaseMatches("q", [], [], []).majority() is None


def test_similarity_vote_weighs_each_case_by_its_cosine() -> None:
    from milcore.trust.retrieval import CaseMatches, SimilarCase

    cases = [SimilarCase("a", "AML", 0.9, 1, []), SimilarCase("b", "AML", 0.8, 1, []),
             SimilarCase("c", "control", -0.9, 1, []), SimilarCase("d", "control", -0.8, 1, []),
             SimilarCase("e", "control", -0.7, 1, [])]  # fmt: skip
    m = CaseMatches("q", cases, [], [0])
    assert m.majority("count") == "control"  # 3 votes to 2
    assert m.majority("similarity") == "AML"  # 0.95 + 0.90 > 0.05 + 0.10 + 0.15
    with pytest.raises(ValueError, match="vote 'most'"):
        m.majority("most")


def test_centred_index_subtracts_each_folds_training_mean(index_and_models, dropout_run: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """Bag embeddings of a ReLU MLP are non-negative: uncentred cosines crowd near 1. The index subtracts each
    fold's training mean from training and query embeddings alike, and keeps the means on disk."""
    from milcore.data.store import open_bags
    from milcore.trust.retrieval import CaseIndex, _embed, build_index

    _, models = index_and_models
    index = build_index(dropout_run, device="cpu", center=True)
    assert sorted(index.centers) == sorted(fm.fold for fm in models.folds)
    fm = models.folds[0]
    data = open_bags(models.bank, models.cohort, models.task)
    raw, _ = _embed(fm, data.view(fm.train), "cpu", 16384, len(models.classes))  # (n_f, E)
    assert np.allclose(index.centers[fm.fold], raw.mean(0), atol=1e-5)
    centred = raw - raw.mean(0)
    assert np.allclose(index.embeddings[fm.fold], centred / np.linalg.norm(centred, axis=1, keepdims=True), atol=1e-5)
    assert np.allclose(index.query_vectors(fm.fold, raw), centred, atol=1e-6)
    index.save(tmp_path / "index.h5")
    again = CaseIndex.load(tmp_path / "index.h5")
    assert all(np.allclose(again.centers[k], index.centers[k]) for k in index.centers)
    plain = build_index(dropout_run, device="cpu", center=False)
    assert plain.centers == {} and np.allclose(plain.query_vectors(0, raw), raw)
    assert np.allclose(plain.embeddings[fm.fold], raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_a_stored_index_of_the_other_centring_is_rebuilt(run_copy: Path) -> None:
    from milcore.trust.retrieval import CENTER, INDEX_FILE, build_index, index_for_run

    build_index(run_copy, device="cpu", center=not CENTER).save(run_copy / INDEX_FILE)  # e.g. written before centring
    index, _ = index_for_run(run_copy, device="cpu")
    assert bool(index.centers) == CENTER  # not silently searched the other way


def test_index_on_another_encoders_bank_is_refused(index_and_models, planted_factory, tmp_path: Path,
                                                   dropout_run: Path) -> None:  # fmt: skip
    from feature_cache.bank.errors import EncoderMismatchError
    from milcore.data.store import open_bags
    from milcore.trust.retrieval import build_index, similar_cases

    index, models = index_and_models
    other = planted_factory(tmp_path / "other", n_bags=6, encoder="other")
    bags = open_bags(other["bank"], other["cohort"], "dx")
    with pytest.raises(EncoderMismatchError, match="similar-case index"):
        similar_cases(index, models, bags, k=2)
    with pytest.raises(EncoderMismatchError, match="encoder mismatch"):
        build_index(dropout_run, data=bags, device="cpu")


def test_an_index_of_other_checkpoints_is_rebuilt(run_copy: Path) -> None:
    from milcore.trust.retrieval import INDEX_FILE, index_for_run

    index, models = index_for_run(run_copy, device="cpu")
    assert (run_copy / INDEX_FILE).exists()
    index.checksums = {"0": "x"}
    with pytest.raises(UserError, match="other fold checkpoints"):
        index.check_models(models, "here")
    index.save(run_copy / INDEX_FILE)  # a stale index on disk
    rebuilt, _ = index_for_run(run_copy, device="cpu")
    assert rebuilt.checksums == models.checksums()


def test_damaged_index_file_is_refused(tmp_path: Path) -> None:
    from milcore.trust.retrieval import CaseIndex

    path = tmp_path / "similar_index.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="unreadable similar-case index"):
        CaseIndex.load(path)


# ----------------------------------------------------------------------------- milcore explain --similar
def test_explain_similar_shows_cases_with_their_cells(run_copy: Path, planted: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from feature_cache.bank import open_reader

    bank = open_reader(planted["bank"])
    crops = tmp_path / "crops"
    for b in bank.bag_ids():
        (crops / b).mkdir(parents=True)
        for cid in bank.read_column(b, "cell_id"):
            Image.fromarray(np.full((8, 8, 3), int(cid) % 250, np.uint8)).save(crops / b / f"{cid}.png")
    out = tmp_path / "explain"
    rc = main(["explain", "--run", str(run_copy), "--out", str(out), "--patients", "2", "--similar", "3",
               "--similar-crops", str(crops)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["similar"]) == 2
    for b, entry in summary["similar"].items():
        assert len(entry["cases"]) == 3 and b not in {c["bag_id"] for c in entry["cases"]}
        assert entry["majority"] in ("control", "sick") and all(c["cells"] for c in entry["cases"])
    md = (out / "explain.md").read_text()
    assert "## Similar training cases" in md and "most characteristic cells" in md
    assert summary["missing_crops"] == 0


def test_explain_similar_on_new_patients(run_copy: Path, planted_factory, tmp_path: Path) -> None:
    new = planted_factory(tmp_path / "new", n_bags=4, seed=5)
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run_copy), "--bank", str(new["bank"]), "--out", str(pred),
                 "--abstain-above", "0.2"]) == 0  # fmt: skip
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(pred), "--out", str(out), "--similar", "5"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["similar"]) == 4
    assert all(len(e["cases"]) == 5 and sorted(e["folds"]) == [0, 1, 2] for e in summary["similar"].values())
    assert "referred for review" in summary["abstention"]["sentence"]
    assert "## Referred for review" in (out / "explain.md").read_text()
