"""Subgroups from cohort metadata: sex codes, ages, bands, intersections, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.audit.config import AuditConfig, parse_age_bands
from milcore.audit.groups import build_groups, read_metadata


def _cols(**kw: list) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=object) for k, v in kw.items()}


def test_sex_codes_are_mapped_or_reported() -> None:
    cols = _cols(sex=["F", "female", "W", "m", "Male", "x", "", "F"])
    gs = build_groups(cols, 8, AuditConfig(attributes=("sex",)))
    assert gs.values["sex"].tolist() == ["F", "F", "F", "M", "M", "", "", "F"]
    assert [g.name for g in gs.groups] == ["sex=F", "sex=M"]
    assert any("unknown codes 'x' (1)" in n for n in gs.notes)
    assert any("1 patients without a value" in n for n in gs.notes)
    f = gs.groups[0]
    assert f.size == 4 and f.rest.sum() == 2 and f.scope.sum() == 6


def test_ages_in_bands_non_numeric_reported() -> None:
    cols = _cols(age=["30", "72", "86", "86.5", "abc", "", "101", "59"])
    cfg = AuditConfig(attributes=("age",), age_bands=((18, 59), (60, 71), (72, 86)))
    gs = build_groups(cols, 8, cfg)
    assert gs.values["age"].tolist() == ["18-59", "72-86", "72-86", "72-86", "", "", "", "18-59"]
    assert [g.name for g in gs.groups] == ["age=18-59", "age=72-86"]  # the empty band has no group
    assert any("non-numeric" in n and "'abc'" in n for n in gs.notes)
    assert any("outside every age band" in n for n in gs.notes)


def test_missing_columns_are_skipped_and_named() -> None:
    gs = build_groups(_cols(sex=["F", "M"]), 2, AuditConfig())
    assert gs.missing == ["age", "site"]
    assert any("no 'age' column" in n for n in gs.notes)
    with pytest.raises(UserError, match="none of the audited columns"):
        build_groups(_cols(other=["a"]), 1, AuditConfig())


def test_intersections() -> None:
    cols = _cols(sex=["F", "M", "F", "M"], site=["1", "1", "2", "10"])
    gs = build_groups(cols, 4, AuditConfig(attributes=("sex", "site")))
    names = [g.name for g in gs.groups]
    assert names[:5] == ["sex=F", "sex=M", "site=1", "site=2", "site=10"]  # sites in numeric order
    assert "sex=F & site=2" in names
    inter = next(g for g in gs.groups if g.name == "sex=M & site=10")
    assert inter.level == "intersection" and inter.mask.tolist() == [False, False, False, True]
    assert not build_groups(cols, 4, AuditConfig(attributes=("sex", "site"), intersections=False)).of("sex x site")


def test_age_band_parsing_and_validation() -> None:
    assert parse_age_bands("0-45, 46-59") == ((0, 45), (46, 59))
    with pytest.raises(InvalidArgumentError, match="LOW-HIGH"):
        parse_age_bands("0-45,old")
    with pytest.raises(InvalidArgumentError, match="overlap"):
        AuditConfig(age_bands=((0, 50), (50, 60)))
    with pytest.raises(InvalidArgumentError, match="test_metrics must be one of"):
        AuditConfig(test_metrics=("accuracyy",))


def test_read_metadata_matches_and_reports(tmp_path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("patient_id,aml,age,sex\na,x,30,F\nb,y,40,M\n")
    cols, matched, missing = read_metadata(path, ["b", "a", "zz"])
    assert matched == ["b", "a"] and missing == ["zz"] and cols["sex"].tolist() == ["M", "F"]
    with pytest.raises(UserError, match="no bag id in common"):
        read_metadata(path, ["q"])
    path.write_text("patient_id,age\na,1\na,2\n")
    with pytest.raises(UserError, match="duplicate bag id"):
        read_metadata(path, ["a"])
