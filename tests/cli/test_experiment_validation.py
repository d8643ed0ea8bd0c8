"""``milcore run``: the whole experiment file is checked before its first step does any work (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_cache.errors import UserError
from milcore.cli import main
from milcore.cli.steps import load_steps, step_commands

SYNTH = '{_: "{out}/cohort", task: all, patients: 6, seed: 0, bag_median: 12, bag_min: 10, bag_max: 20}'


def _file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "exp.yaml"
    body = body.replace("RUNS", str(tmp_path / "runs"))
    path.write_text(body if body.startswith("vars") else f"vars: {{out: {tmp_path / 'runs'}}}\n" + body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # a later step's unknown key used to fail only after step 1 had written its cohort
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: b.h5, cohort: c.csv, task: all, out: o, epoch: 2}}\n",
         "step 2 (train): key 'epoch' is not an option of 'milcore train' (did you mean 'epochs'?)"),
        # ... or was silently ignored (a top-level typo)
        (f"stepz: []\nsteps:\n  - synth: {SYNTH}\n", "unknown top-level key(s) 'stepz' (did you mean 'steps'?)"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: b.h5, task: all, out: o}}\n",
         "step 2 (train): the following arguments are required: --cohort"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: b.h5, cohort: c, task: all, out: o, folds: two}}\n",
         "step 2 (train): argument --folds: expected a whole number, got 'two'"),
        (f"steps:\n  - synth: {SYNTH}\n  - bench: {{_: aggregators, bank: b, cohort: c, task: t, out: o, folds: 2}}\n",
         "step 2 (bench): argument --folds: must be >= 3, got 2"),
        (f"steps:\n  - synth: {SYNTH}\n  - trian: {{}}\n", "step 2: unknown command 'trian' (did you mean 'train'?)"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: '{{nowhere}}/b.h5'}}\n",
         "step 2 (train): key 'bank': unknown placeholder {nowhere}"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: '{{out'}}\n",
         "step 2 (train): key 'bank': malformed placeholder"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: '{{0}}'}}\n",
         "placeholder {0} in '{0}' is not a variable name"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{bank: {{a: 1}}}}\n", "key 'bank': a value must be a scalar"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: [1, [2]]\n", "raw arguments must be scalars"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{true: 1}}\n", "True is not an option name"),
        (f"steps:\n  - synth: {SYNTH}\n  - train: {{help: true}}\n", "asks for help"),
        (f"steps:\n  - synth: {SYNTH}\n  - run: {{}}\n", "unknown command 'run'"),
        ("vars: [1]\nsteps:\n  - synth: {_: RUNS, task: all}\n", "'vars' must be a mapping"),
        ("vars: {a: [1]}\nsteps:\n  - synth: {_: RUNS, task: all}\n", "vars: 'a' must be a scalar"),
        ("name: [x]\nsteps:\n  - synth: {_: RUNS, task: all}\n", "'name' must be a non-empty string"),
    ],
)
def test_a_bad_step_anywhere_fails_before_the_first_step_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str
) -> None:
    path = _file(tmp_path, body)
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err, err
    assert not (tmp_path / "runs").exists(), "step 1 must not have run"


def test_prefixes_of_options_are_refused_in_steps_and_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, f"steps:\n  - synth: {SYNTH}\n  - train: [--bank, b, --cohort, c, --task, t, --out, o, "
                           "--epoch, '2']\n")  # fmt: skip
    assert main(["run", str(path)]) == 2
    assert "unrecognized arguments: --epoch 2" in capsys.readouterr().err
    assert main(["train", "--bank", "b", "--cohort", "c", "--task", "t", "--out", "o", "--epoch", "2"]) == 2
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


def test_set_must_name_a_variable(tmp_path: Path) -> None:
    path = _file(tmp_path, f"steps:\n  - synth: {SYNTH}\n")
    with pytest.raises(UserError, match=r"--set outt: .* has no variable 'outt' \(did you mean 'out'\?\)"):
        load_steps(path, {"outt": "elsewhere"})
    assert load_steps(path, {"out": "elsewhere"})[1][0][1] == "elsewhere/cohort"


def test_literal_braces_and_scalars(tmp_path: Path) -> None:
    path = _file(tmp_path, "steps:\n  - synth: {_: '{{x}}', task: all, patients: 6, seed: 0, overwrite: true, "
                           "sites: null}\n")  # fmt: skip
    _, steps = load_steps(path)
    assert steps == [["synth", "{x}", "--task", "all", "--patients", "6", "--seed", "0", "--overwrite"]]


def test_every_subcommand_but_run_is_a_step() -> None:
    from milcore.cli import COMMANDS

    assert set(step_commands()) == set(COMMANDS) - {"run"} and "models" in step_commands()


def test_models_lists_the_registry_and_train_help_points_to_it(capsys: pytest.CaptureFixture[str]) -> None:
    from milcore.models import get_aggregator_entry, list_aggregators

    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list_aggregators()
    assert all(get_aggregator_entry(line.split()[0]).summary in line for line in out)
    assert main(["models", "abmil"]) == 0
    assert "embed_dim = 256" in capsys.readouterr().out
    assert main(["models", "abml"]) == 2
    assert "did you mean 'abmil'" in capsys.readouterr().err
    for argv in (["train", "--help"], ["bench", "aggregators", "--help"]):
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--list-models" not in text and "'milcore models'" in text
        assert "at least 3" in text, "the --folds minimum is stated"
