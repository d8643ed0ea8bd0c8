"""Cohort tables as users write them: missing-value spellings, encodings, separators, bad rows (issue 13)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import UserError
from milcore.data.cohort import MISSING_VALUES, is_missing, read_cohort

SPELLINGS = ["", "NA", "N/A", "n/a", "n.a.", "#N/A", "#NA", "<NA>", "NaN", "nan", "-NaN", "null", "NULL",
             "-", "--", "?", ".", "  NA  "]  # fmt: skip


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_missing_label_spellings_are_missing_not_a_class(
    tmp_path: Path, spelling: str, caplog: pytest.LogCaptureFixture
) -> None:
    text = f"patient_id,dx\np1,control\np2,{spelling}\np3,sick\n"
    with caplog.at_level(logging.WARNING):
        cohort = read_cohort(_write(tmp_path / "c.csv", text), "dx")
    assert cohort.classes == ("control", "sick")
    assert list(cohort.bag_ids) == ["p1", "p3"]
    assert cohort.missing_labels == {spelling.strip(): 1}
    assert "1 rows have no 'dx' label" in caplog.text


def test_the_log_counts_missing_rows_per_spelling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "patient_id,dx\np1,control\np2,NA\np3,NA\np4,\np5,null\np6,sick\n"
    with caplog.at_level(logging.WARNING):
        cohort = read_cohort(_write(tmp_path / "c.csv", text), "dx")
    assert cohort.missing_labels == {"NA": 2, "": 1, "null": 1}
    assert "4 rows have no 'dx' label" in caplog.text and "'NA' x2" in caplog.text and "empty x1" in caplog.text


def test_words_that_may_be_categories_are_not_missing() -> None:
    assert all(is_missing(s) for s in SPELLINGS) and is_missing(None)
    for word in ("unknown", "other", "0", "none", "None", "none-of-these", "NAFLD", "n"):
        assert not is_missing(word)
    assert all(s == s.strip().lower() for s in MISSING_VALUES)


def test_missing_metadata_reads_as_empty_and_missing_groups_are_own_patients(tmp_path: Path) -> None:
    text = "bag_id,dx,sex,patient\ns1,a,NA,P1\ns2,b,F,P1\ns3,a,null,N/A\ns4,b,M,\n"
    cohort = read_cohort(_write(tmp_path / "c.csv", text), "dx")
    assert cohort.columns["sex"].tolist() == ["", "F", "", "M"]
    assert cohort.groups.tolist() == ["P1", "P1", "s3", "s4"], "no shared '' patient for bags without one"


def test_bag_ids_are_kept_as_written(tmp_path: Path) -> None:
    text = "bag_id,dx\n007,a\n 1e3 ,b\nNA,a\n0x10,b\n"
    cohort = read_cohort(_write(tmp_path / "c.csv", text), "dx")
    assert list(cohort.bag_ids) == ["007", "1e3", "NA", "0x10"]


@pytest.mark.parametrize(("sep", "encoding"), [(",", "utf-8-sig"), (";", "latin-1"), ("\t", "utf-16"),
                                                (";", "cp1252"), (",", "utf-8")])  # fmt: skip
def test_separators_and_encodings(tmp_path: Path, sep: str, encoding: str) -> None:
    rows = [["patient_id", "dx", "note"], ["Müller-1", "control", "a,b;c"], ["Ødegård", "AML", ""]]
    text = "\r\n".join(sep.join(f'"{c}"' if (sep in c or "," in c or ";" in c) else c for c in r) for r in rows)
    cohort = read_cohort(_write(tmp_path / "c.csv", text + "\r\n\r\n", encoding), "dx")
    assert list(cohort.bag_ids) == ["Müller-1", "Ødegård"]
    assert cohort.columns["note"].tolist() == ["a,b;c", ""]


def test_header_whitespace_blank_lines_and_an_unnamed_index_column(tmp_path: Path) -> None:
    text = ",patient_id , dx \n\n0,p1,control\n   \n1,p2,sick\n,,\n"
    cohort = read_cohort(_write(tmp_path / "c.csv", text), "dx")
    assert list(cohort.bag_ids) == ["p1", "p2"] and set(cohort.columns) == set()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("patient_id,aml\np1,NPM1\np2,control\np1,control\n",
         r"duplicate bag ids in 'patient_id': 'p1' \(line 2, line 4\)"),
        ("patient_id,aml\np1,NA\np1,control\n", "duplicate bag ids"),
        ("patient_id,aml\np1,control\n,NPM1\n", r"labelled rows without a bag id in 'patient_id' \(line 3\)"),
        ("patient_id,aml\np1,control\np2,Control\n", "differ only in case: 'Control' / 'control'"),
        ("patient_id,aml\np1,control,x\n", "line 2 has 3 fields but the header has 2"),
        ("patient_id,aml,aml\np1,control,x\n", "'aml' appear more than once"),
        ("patient_id,aml\n", "no labelled rows"),
        ("patient_id,aml\np1,NA\np2,null\n", r"no labelled rows in column 'aml' \(missing: 'NA' x1, 'null' x1\)"),
        ("", "empty file"),
        ("\n\n  \n", "empty file"),
        ("patient_id,aml\np1,con\x00trol\n", "binary file"),
        ('patient_id,aml\n"p1,control\n', "no labelled rows"),
    ],
)
def test_bad_tables_name_the_file_and_the_place(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "c.csv", text)
    with pytest.raises(UserError, match=message) as info:
        read_cohort(path, "aml")
    assert str(path) in str(info.value)


def test_a_folder_or_a_bank_given_as_cohort(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder"):
        read_cohort(tmp_path, "aml")
    blob = tmp_path / "bank.h5"
    blob.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match="binary file"):
        read_cohort(blob, "aml")


def test_audit_metadata_reads_missing_values_the_same_way(tmp_path: Path) -> None:
    from milcore.audit.config import AuditConfig
    from milcore.audit.groups import build_groups, read_metadata

    text = "patient_id,aml,sex,age,site\np1,a,F,40,A\np2,a,NA,null,NA\np3,b,M,N/A,B\np4,b,-,70,?\n"
    columns, _, _ = read_metadata(_write(tmp_path / "c.csv", text), ["p1", "p2", "p3", "p4"])
    assert columns["site"].tolist() == ["A", "", "B", ""]
    groups = build_groups(columns, 4, AuditConfig())
    names = {g.name for g in groups.groups}
    assert "site=NA" not in names and "site=?" not in names
    assert np.array_equal(groups.values["sex"], np.asarray(["F", "", "M", ""], dtype=object))
    assert not any("unknown codes" in n or "non-numeric" in n for n in groups.notes), groups.notes


def test_parquet_tables_read_like_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"bag_id": ["007", "p2", "p3", "p4"], " dx ": ["control", None, "sick", "NaN"],
                      "age": [40.0, None, 71.5, 3.0]})  # fmt: skip
    pq.write_table(table, tmp_path / "c.parquet")
    cohort = read_cohort(tmp_path / "c.parquet", "dx")
    assert list(cohort.bag_ids) == ["007", "p3"] and cohort.columns["age"].tolist() == ["40.0", "71.5"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable Parquet file"):
        read_cohort(tmp_path / "bad.parquet", "dx")
