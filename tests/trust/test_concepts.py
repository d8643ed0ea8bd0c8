"""Morphological concepts (issue 16 item 4): attribute heads on cell features scored on held-out patients,
saved as JSON and refused on another encoder's bank, the attributes of each patient's top-attention cells
in explain.json / explain.html and RUN/concepts.json read by the passport."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import EncoderInfo, open_reader
from feature_cache.errors import UserError
from milcore.cli import main
from milcore.trust.concepts import AttributeHeads, ConceptConfig, describe_top_cells, fit_attribute_heads


def _cells(n: int = 600, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Features where nc_ratio follows feature 0 and chromatin (3 values) feature 1; 20 patients."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    nc = np.where(x[:, 0] > 0, "high", "low").astype(object)
    chrom = np.asarray(["fine", "coarse", "open"], dtype=object)[np.digitize(x[:, 1], [-0.5, 0.5])]
    return x, {"nc_ratio": nc, "chromatin": chrom}, np.repeat(np.arange(20), n // 20).astype(str)


def test_heads_learn_attributes_scored_on_held_out_patients() -> None:
    x, labels, groups = _cells()
    labels["vacuoles"] = np.full(len(x), "no", dtype=object)  # one value: skipped, named
    labels["nc_ratio"][:5] = ""  # unknown labels left out
    heads = fit_attribute_heads(x, labels, groups, ConceptConfig(heldout_fraction=0.25))
    ev = heads.evaluation
    assert set(heads.attributes) == {"nc_ratio", "chromatin"} and "vacuoles" in ev["skipped"]
    assert ev["nc_ratio"]["macro_f1"] > 0.9 and ev["chromatin"]["macro_f1"] > 0.8
    assert ev["patients_heldout"] == 5 and ev["patients_train"] == 15
    assert ev["nc_ratio"]["cells_train"] + ev["nc_ratio"]["cells_heldout"] == len(x) - 5
    with pytest.raises(UserError, match="two patients"):
        fit_attribute_heads(x, labels, np.zeros(len(x), dtype=str))


def test_heads_round_trip_as_json_and_refuse_another_encoder(tmp_path: Path) -> None:
    x, labels, groups = _cells()
    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=6)
    heads = fit_attribute_heads(x, labels, groups, encoder=info.to_dict())
    path = heads.save(tmp_path / "heads.json")
    back = AttributeHeads.load(path)
    for a in heads.attributes:
        assert (back.predict(x)[a] == heads.predict(x)[a]).all()
    back.check_encoder(info)
    other = EncoderInfo(name="efficientnet_lite0", version="1", weights_sha256="a" * 64, transform="none", dim=6)
    with pytest.raises(UserError, match="attribute heads were trained on 'toy'"):
        back.check_encoder(other, "other.h5")
    damaged = json.loads(path.read_text())
    damaged["coef"]["chromatin"] = damaged["coef"]["chromatin"][:1]
    with pytest.raises(UserError, match="chromatin"):
        AttributeHeads.from_dict(damaged)
    with pytest.raises(UserError, match="not a milcore-attribute-heads"):
        AttributeHeads.from_dict({"format": "pickle"})


def test_describe_names_what_sets_the_top_cells_apart() -> None:
    x, labels, groups = _cells()
    heads = fit_attribute_heads(x, labels, groups)
    patient = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    patient[:, 0] = -2.0  # every cell low N:C ...
    patient[:4, 0] = 3.0  # ... except the four the model looked at
    desc = describe_top_cells(heads, patient[:4], patient)
    assert desc["summary"].startswith("high N:C ratio") and len(desc["cells"]) == 4
    assert desc["enriched"][0]["top_share"] == 1.0 and desc["enriched"][0]["patient_share"] == 0.1
    plain = describe_top_cells(heads, patient[10:14], patient)
    assert "high N:C ratio" not in plain["summary"]


def _attribute_table(planted: dict, path: Path) -> Path:
    """The planted cells.csv plus nc_ratio (high on the diagnostic cells) and a random chromatin."""
    rows = list(csv.DictReader(Path(planted["cells"]).read_text().splitlines()))
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "cell_id", "nc_ratio", "chromatin"])
        for r in rows:
            w.writerow([r["patient_id"], r["cell_id"], "high" if r["is_diagnostic"] == "1" else "low",
                        rng.choice(["fine", "coarse"])])  # fmt: skip
    return path


def test_explain_shows_the_attributes_of_the_top_cells(run_copy: Path, planted: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    table = _attribute_table(planted, tmp_path / "cells_attr.csv")
    rc = main(["explain", "--run", str(run_copy), "--out", str(tmp_path / "ex"), "--attributes", str(table),
               "--patients", "18", "--top", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert summary["concepts"]["scores"]["nc_ratio"] > 0.85
    patients = summary["patients"]
    described = [b for b, p in patients.items() if p["label"] == "sick" and p["predicted"] == "sick"]
    assert described and all("attributes" in p for p in patients.values())
    hits = [b for b in described if "high N:C ratio" in patients[b]["attributes"]["summary"]]
    assert len(hits) >= 0.7 * len(described)
    assert "Morphological attributes of the top cells" in (tmp_path / "ex" / "explain.html").read_text()
    concepts = json.loads((run_copy / "concepts.json").read_text())
    assert concepts["format"] == "milcore-attribute-heads" and set(concepts["attributes"]) == {"nc_ratio", "chromatin"}
    assert main(["passport", str(run_copy)]) == 0
    passport = json.loads((run_copy / "passport.json").read_text())
    assert passport["concepts"]["status"] == "available" and "nc_ratio" in passport["concepts"]["attributes"]
    # the training report (HTML and Markdown) now shows the attributes of its patients' top cells
    report = (run_copy / "report.md").read_text()
    assert "Morphological attributes of the top cells" in report and "| attributes of the top-8 cells |" in report
    assert "| nc_ratio | 1.000 |" in report or "| nc_ratio | 0.9" in report  # the heads' held-out macro-F1
    assert "Morphological attributes of the top cells" in (run_copy / "report.html").read_text()
    assert "## Headline" in report and "## Uncertainty and abstention" in report  # the rest of the report kept
    # the saved heads are reused as they are, and the file they come from keeps its 18 patients
    assert main(["explain", "--run", str(run_copy), "--out", str(tmp_path / "ex2"), "--attributes",
                 str(run_copy / "concepts.json"), "--patients", "2"]) == 0  # fmt: skip
    assert json.loads((run_copy / "concepts.json").read_text())["patients"] == concepts["patients"]
    assert len(concepts["patients"]) == 18


def test_bad_attribute_inputs_are_one_line_errors(run_copy: Path, planted: dict, planted_factory, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    rc = main(["explain", "--run", str(run_copy), "--out", str(tmp_path / "a"), "--attributes", str(planted["cells"])])
    err = capsys.readouterr().err
    assert rc == 2 and "no attribute column" in err and len(err.strip().splitlines()) == 1
    other = planted_factory(tmp_path / "other", n_bags=6, sizes=(20, 30), encoder="other")
    table = _attribute_table(planted, tmp_path / "cells_attr.csv")
    with open_reader(other["bank"]) as bank:
        heads_path = tmp_path / "h.json"
        from milcore.trust.concepts import load_or_fit_heads

        load_or_fit_heads(table, bank, bank.bag_ids()).save(heads_path)
    capsys.readouterr()
    rc = main(["explain", "--run", str(run_copy), "--out", str(tmp_path / "b"), "--attributes", str(heads_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "attribute heads were trained on 'other'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "explain.json").exists()
