"""Property-based tests of YAML experiments (issue 13): any file either loads into exactly the steps it
describes or fails with a :class:`UserError` naming the file; never an internal error. Nothing runs:
:func:`load_steps` checks the whole file (every step parsed by the real parser) up front.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_cache.errors import UserError
from milcore.cli.steps import TOP_LEVEL_KEYS, load_steps, step_commands

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORD = st.text("abcxyz019_./", min_size=1, max_size=8).filter(lambda s: not s.startswith("-"))
KEYS = st.one_of(st.sampled_from(["bank", "cohort", "task", "out", "epochs", "epoch", "folds", "seed", "model",
                                  "_", "overwrite", "patients", "lr", "set", "help", "x y", "--out"]),
                 st.text(max_size=6), st.integers(), st.booleans(), st.none())  # fmt: skip
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), WORD,
                    st.text(max_size=10), st.sampled_from(["{out}", "{nope}", "{", "}", "{0}", "{out.x}", "{{a}}"]))
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                   max_leaves=12)  # fmt: skip
COMMAND = st.one_of(st.sampled_from([*step_commands(), "run", "trian"]), st.text(max_size=5), st.integers())
STEP = st.one_of(st.dictionaries(COMMAND, st.one_of(st.none(), st.dictionaries(KEYS, ANY, max_size=5), ANY),
                                 min_size=1, max_size=2), ANY)  # fmt: skip
DOC = st.fixed_dictionaries(
    {},
    optional={"name": ANY, "vars": st.one_of(st.dictionaries(KEYS, SCALARS, max_size=3), ANY),
              "steps": st.one_of(st.lists(STEP, max_size=4), ANY), "description": ANY, "stepz": ANY},
)  # fmt: skip


def _load(text: str) -> tuple[Path, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_text(text)
        try:
            return path, load_steps(path)
        except UserError as exc:
            assert str(path) in str(exc), f"the error does not name the file: {exc}"
            return path, exc


@SETTINGS
@given(DOC)
def test_random_structures_load_or_fail_naming_the_file(doc: dict) -> None:
    _, result = _load(yaml.safe_dump(doc))
    if isinstance(result, UserError):
        return
    name, steps = result
    assert set(doc) <= set(TOP_LEVEL_KEYS) and isinstance(name, str) and steps
    assert all(argv[0] in step_commands() for argv in steps)


@SETTINGS
@given(st.text(max_size=200))
def test_random_text_loads_or_fails_naming_the_file(text: str) -> None:
    _load(text)


SYNTH = {"task": st.sampled_from(["aml", "all", "anemia"]), "patients": st.integers(1, 500),
         "seed": st.integers(0, 2**31), "overwrite": st.booleans(), "sites": st.one_of(st.none(), st.integers(1, 5))}
TRAIN = {"bank": WORD, "cohort": WORD, "task": WORD, "out": WORD, "folds": st.integers(3, 10),
         "epochs": st.integers(1, 500), "lr": st.floats(1e-6, 1.0), "model_arg": st.lists(WORD.map("k={}".format),
         max_size=2), "resume": st.booleans()}  # fmt: skip
REQUIRED = {"synth": ("task",), "train": ("bank", "cohort", "task", "out")}


@st.composite
def valid_step(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    command = draw(st.sampled_from(["synth", "train"]))
    catalogue = SYNTH if command == "synth" else TRAIN
    keys = draw(st.sets(st.sampled_from(sorted(catalogue))))
    options = {k: draw(catalogue[k]) for k in sorted(set(keys) | set(REQUIRED[command]))}
    if command == "synth":
        options = {"_": "{out}/" + draw(WORD), **options}
    return command, options


def _expected(command: str, options: dict[str, Any], out: str) -> list[str]:
    argv = [command]
    if "_" in options:
        argv.append(options["_"].replace("{out}", out))
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "_" or value is False or value is None:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [x for v in value for x in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


@SETTINGS
@given(st.lists(valid_step(), min_size=1, max_size=4), WORD, st.data())
def test_valid_experiments_load_exactly_and_one_bad_key_is_named(steps: list, out: str, data: st.DataObject) -> None:
    doc = {"name": "fuzz", "vars": {"out": out}, "steps": [{c: o} for c, o in steps]}
    _, result = _load(yaml.safe_dump(doc))
    assert not isinstance(result, UserError), result
    name, argvs = result
    assert name == "fuzz" and argvs == [_expected(c, o, out) for c, o in steps]
    i = data.draw(st.integers(0, len(steps) - 1))
    bad = data.draw(st.sampled_from(["epoch", "foldz", "bogus_key", "cohorts"]))
    doc["steps"][i] = {steps[i][0]: {**steps[i][1], bad: 1}}
    path, result = _load(yaml.safe_dump(doc))
    assert isinstance(result, UserError), f"unknown key {bad!r} accepted"
    assert f"{path}: step {i + 1} ({steps[i][0]}): key {bad!r}" in str(result)
