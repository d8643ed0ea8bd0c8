"""Property-based tests of the cohort-table reader (issue 13): every generated table either loads with
exactly the generated values or fails with a :class:`UserError` naming the file; never an internal error.

The generator writes what users' tools write: UTF-8 with and without BOM, UTF-16 (Excel's "Unicode
text"), Windows-1252 and Latin-1; ``,`` ``;`` or tab separators; minimal or full quoting; LF or CRLF;
blank lines and lines of bare separators; whitespace around cells; missing labels in every spelling
and case; numeric-looking ids (``007`` must stay ``007``); duplicate ids; a header and no rows.
"""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from feature_cache.errors import UserError
from milcore.data.cohort import MISSING_VALUES, read_cohort

CLASSES = ("control", "AML", "ALL")
NUMERIC_IDS = ("007", "0", "00", "1e3", "1.50", "-1", "0x1F", "NA", "null", "1,5", "2;3")
ID_ALPHABET = "abcXYZ0123456789-_.#äöüßéñØ" + " ,;'\""
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _case(text: str, pattern: int) -> str:
    return text if pattern == 0 else text.upper() if pattern == 1 else text.title()


missing_spelling = st.builds(
    lambda base, case, pad: pad + _case(base, case) + pad,
    st.sampled_from(sorted(MISSING_VALUES)), st.integers(0, 2), st.sampled_from(["", " ", "  "]),
)
bag_id = st.one_of(
    st.sampled_from(NUMERIC_IDS),
    st.text(ID_ALPHABET, min_size=1, max_size=8).filter(lambda s: s.strip() != ""),
)
label = st.one_of(st.sampled_from(CLASSES), missing_spelling)
age = st.one_of(st.sampled_from(["40", " 71 ", "x"]), missing_spelling)
row = st.tuples(bag_id, label, age, st.sampled_from(["", " ", "  "]))


@st.composite
def tables(draw: st.DrawFn) -> dict:
    rows = draw(st.lists(row, max_size=10))
    return {
        "rows": [(b, lab, a, pad) for b, lab, a, pad in rows],
        "sep": draw(st.sampled_from([",", ";", "\t"])),
        "quoting": draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
        "newline": draw(st.sampled_from(["\n", "\r\n"])),
        "encoding": draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"])),
        "blank_after": draw(st.sets(st.integers(0, 10), max_size=3)),
        "blank_kind": draw(st.sampled_from(["", "   ", "sep"])),
    }


def _render(t: dict) -> tuple[bytes, str]:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=t["sep"], quoting=t["quoting"], lineterminator=t["newline"])
    writer.writerow(["patient_id", "dx", "age"])
    blank = t["sep"] * 2 if t["blank_kind"] == "sep" else t["blank_kind"]
    for i, (b, lab, a, pad) in enumerate(t["rows"]):
        writer.writerow([b + pad, lab, a + pad])
        if i in t["blank_after"]:
            buf.write(blank + t["newline"])
    text = buf.getvalue()
    encoding = t["encoding"]
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        encoding, data = "utf-8", text.encode("utf-8")
    if encoding in ("cp1252", "latin-1") and not text.isascii():
        try:  # bytes that are also valid UTF-8 are read as UTF-8: the file is ambiguous, not a test case
            data.decode("utf-8")
            assume(False)
        except UnicodeDecodeError:
            pass
    return data, encoding


def _missing(text: str) -> bool:
    return text.strip().lower() in MISSING_VALUES


@SETTINGS
@given(tables())
def test_generated_cohort_tables_load_exactly_or_fail_naming_the_file(t: dict) -> None:
    data, _ = _render(t)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cohort.csv"
        path.write_bytes(data)
        ids = [b.strip() for b, *_ in t["rows"]]
        dupes = {b for b in ids if ids.count(b) > 1}
        kept = [(b.strip(), lab.strip(), a.strip()) for b, lab, a, _ in t["rows"] if not _missing(lab)]
        if dupes or not kept:
            try:
                read_cohort(path, "dx")
            except UserError as exc:
                assert str(path) in str(exc)
                assert ("duplicate bag ids" in str(exc)) if dupes else ("no labelled rows" in str(exc))
                return
            raise AssertionError("a table with duplicate ids or no labelled row was accepted")
        cohort = read_cohort(path, "dx")
    assert list(cohort.bag_ids) == [b for b, _, _ in kept]
    assert [cohort.classes[i] for i in cohort.labels] == [lab for _, lab, _ in kept]
    present = {lab for _, lab, _ in kept}
    assert cohort.classes == tuple((["control"] if "control" in present else [])
                                   + sorted(present - {"control"}))  # fmt: skip
    assert cohort.columns["age"].tolist() == ["" if _missing(a) else a for _, _, a in kept]
    assert sum(cohort.missing_labels.values()) == len(t["rows"]) - len(kept)


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([b"", b"patient_id,dx\n", b"\xef\xbb\xbfbag_id;dx\r\n"]))
def test_arbitrary_bytes_never_give_an_internal_error(noise: bytes, head: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cohort.csv"
        path.write_bytes(head + noise)
        try:
            cohort = read_cohort(path, "dx")
        except UserError as exc:
            assert str(path) in str(exc)
            return
    assert len(cohort.bag_ids) == len(set(cohort.bag_ids)) >= 1
    assert all(b and b == b.strip() for b in cohort.bag_ids)
    assert not any(c.strip().lower() in MISSING_VALUES for c in cohort.classes)
