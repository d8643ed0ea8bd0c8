"""The model passport: written by every run, valid against docs/passport.schema.json, regenerated after an audit
or a shortcut check, refused on a bank from another encoder or with other contents.

Every passport.json the test suite writes under its temporary folders is validated at the end of the session
(``passports_meet_their_schema`` in ``tests/conftest.py``), and the writer validates each one before writing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milcore.cli import main
from milcore.trust.passport import (
    PassportSchemaError,
    build_passport,
    load_schema,
    schema_errors,
    write_passport,
)

SECTIONS = ("intended_use", "data", "splits", "performance", "calibration", "uncertainty", "subgroups", "shortcuts",
            "concepts", "software", "limitations")  # fmt: skip


def test_every_run_writes_a_valid_passport(dropout_run: Path, planted: dict) -> None:
    passport = json.loads((dropout_run / "passport.json").read_text())
    assert schema_errors(passport) == []
    assert all(passport[s] for s in SECTIONS)
    data = passport["data"]
    assert data["bank"]["cells"] == len(Path(planted["cells"]).read_text().splitlines()) - 1  # every cell
    assert data["cohort"]["patients"] == 18 and data["cohort"]["class_counts"] == {"control": 9, "sick": 9}
    assert data["encoder"]["name"] == "toy" and len(data["bank"]["fingerprint"]) == 64
    assert [c["fold"] for c in passport["model"]["checkpoints"]] == [0, 1, 2]
    assert passport["performance"]["pooled"]["balanced_accuracy"]["ci95"][0] is not None
    assert passport["uncertainty"]["status"] == "computed" and "mc_dropout" in passport["uncertainty"]["scores"]
    assert passport["subgroups"]["status"] == "not audited" and passport["shortcuts"]["status"] == "not checked"
    codes = {x["code"] for x in passport["limitations"]}
    assert {"not_audited", "shortcuts_not_checked", "internal_validation_only", "encoder_bound"} <= codes
    metrics = json.loads((dropout_run / "metrics.json").read_text())
    assert {w["code"] for w in metrics["warnings"]} <= codes  # the run's caveats are known limitations
    md = (dropout_run / "passport.md").read_text()
    for heading in ("Intended use", "Data provenance", "Uncertainty and abstention", "Known limitations"):
        assert f"## {heading}" in md


def test_schema_rejects_a_broken_passport(dropout_run: Path) -> None:
    passport = json.loads((dropout_run / "passport.json").read_text())
    assert load_schema()["properties"]["format"]["const"] == "milcore-passport"
    broken = {k: v for k, v in passport.items() if k != "limitations"}
    assert any("limitations" in e for e in schema_errors(broken))
    bad_status = json.loads(json.dumps(passport))
    bad_status["shortcuts"]["status"] = "fine"
    assert schema_errors(bad_status)
    extra = {**passport, "surprise": 1}
    assert schema_errors(extra)


def test_writer_validates_before_writing(run_copy: Path) -> None:
    before = (run_copy / "passport.json").read_text()
    passport = json.loads(before)
    passport["uncertainty"]["best"] = "astrology"
    with pytest.raises(PassportSchemaError, match="uncertainty/best"):
        write_passport(run_copy, passport)
    assert (run_copy / "passport.json").read_text() == before


def test_passport_after_an_audit_and_a_shortcut_check(run_copy: Path, planted: dict,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    rc = main(["audit", "--run", str(run_copy), "--cohort", str(planted["cohort"]), "--out", str(run_copy / "audit"),
               "--permutations", "50", "--boot", "50", "--min-group", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (run_copy / "shortcuts.json").write_text(json.dumps({
        "summary": {"headline": "site predicts the label"},
        "checks": [{"name": "site", "flagged": True}, {"name": "bag_size", "flagged": False}]}))  # fmt: skip
    assert main(["passport", str(run_copy)]) == 0
    passport = json.loads((run_copy / "passport.json").read_text())
    assert schema_errors(passport) == []
    sub = passport["subgroups"]
    assert sub["status"] == "audited" and sub["groups"] and {g["group"] for g in sub["groups"]} >= {"sex=F", "sex=M"}
    assert passport["shortcuts"]["status"] == "checked" and passport["shortcuts"]["flagged"] == ["site"]
    codes = {x["code"] for x in passport["limitations"]}
    assert "shortcut" in codes and "not_audited" not in codes and "shortcuts_not_checked" not in codes
    md = (run_copy / "passport.md").read_text()
    assert "Flagged: site" in md and "Not audited" not in md


def test_passport_on_another_encoders_bank_is_refused(run_copy: Path, planted_factory, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    before = (run_copy / "passport.json").read_bytes()
    other = planted_factory(tmp_path / "other", n_bags=18, sizes=(20, 40), encoder="other")
    capsys.readouterr()  # the bank writer's log lines
    rc = main(["passport", str(run_copy), "--bank", str(other["bank"])])
    err = capsys.readouterr().err
    assert rc == 2 and "encoder mismatch" in err and len(err.strip().splitlines()) == 1
    assert (run_copy / "passport.json").read_bytes() == before


def test_passport_on_a_bank_with_other_contents_is_refused(run_copy: Path, planted_factory, tmp_path: Path) -> None:
    from feature_cache.errors import UserError

    same_encoder = planted_factory(tmp_path / "reextracted", n_bags=18, sizes=(20, 40), seed=7)
    with pytest.raises(UserError, match="not the bank"):
        build_passport(run_copy, bank=same_encoder["bank"])


def test_audit_of_another_run_is_refused(run_copy: Path, tmp_path: Path) -> None:
    from feature_cache.errors import UserError

    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "audit.json").write_text(json.dumps({"input": {"run": str(tmp_path / "elsewhere")}}))
    with pytest.raises(UserError, match="audits"):
        build_passport(run_copy, audit=audit)


def test_passport_of_an_unfinished_run_is_refused(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (run_copy / "metrics.json").unlink()
    assert main(["passport", str(run_copy)]) == 2
    assert "is the run finished" in capsys.readouterr().err


def test_passport_md_says_what_each_referral_target_costs(dropout_run: Path) -> None:
    """The abstention table names each balanced-accuracy target, the patients kept and referred, and says what
    AURC means, so a hematologist can read it without the glossary."""
    passport = json.loads((dropout_run / "passport.json").read_text())
    md = (dropout_run / "passport.md").read_text()
    section = md.split("## Uncertainty and abstention", 1)[1].split("\n## ", 1)[0]
    assert "keep for BA ≥ 0.90" in section and "keep for BA ≥ 0.95" in section
    assert "AURC" in section and "lower is better" in section and "report.html" in section
    for v in passport["uncertainty"]["scores"].values():
        n = v["n"]
        reach = v["coverage_for_balanced_accuracy"]["0.9"]
        if reach:
            kept = n - reach["referred"]
            assert f"{kept} of {n} (refer {reach['referred']}" in section


def test_passport_gives_the_coverage_for_a_requested_balanced_accuracy(run_copy: Path, capsys: pytest.CaptureFixture,
                                                                       ) -> None:  # fmt: skip
    import csv

    import numpy as np

    from milcore.data.predictions import read_predictions
    from milcore.trust.uncertainty import risk_coverage

    assert main(["passport", str(run_copy), "--coverage-target", "0.8", "--coverage-target", "0.975"]) == 0
    passport = json.loads((run_copy / "passport.json").read_text())
    table = read_predictions(run_copy)
    with open(run_copy / "predictions.csv", newline="") as f:
        entropy = np.asarray([float(r["uncertainty_entropy"]) for r in csv.DictReader(f)])
    reach = passport["uncertainty"]["scores"]["entropy"]["coverage_for_balanced_accuracy"]
    assert list(reach) == ["0.8", "0.9", "0.95", "0.975"]
    want = risk_coverage(table.labels, table.proba, entropy, "entropy").coverage_for(0.975)
    assert (reach["0.975"] is None) == (want is None)
    if want is not None:
        assert reach["0.975"]["coverage"] == pytest.approx(want["coverage"])
    md = (run_copy / "passport.md").read_text()
    assert "keep for BA ≥ 0.80" in md and "keep for BA ≥ 0.975" in md
    capsys.readouterr()
    for bad in ("0", "1.2", "nan"):
        before = (run_copy / "passport.json").read_bytes()
        assert main(["passport", str(run_copy), "--coverage-target", bad]) == 2
        err = capsys.readouterr().err
        assert "--coverage-target" in err and "(0, 1]" in err and len(err.strip().splitlines()) == 1
        assert (run_copy / "passport.json").read_bytes() == before  # refused before anything is written
