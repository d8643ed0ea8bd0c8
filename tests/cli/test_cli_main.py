"""The ``milcore`` command line: cheap help, exit codes, one-line errors, logging options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from milcore.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0
    assert "usage: milcore" in capsys.readouterr().out


def test_help_does_not_import_torch() -> None:
    code = "import sys; from milcore.cli import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


def test_unknown_command_is_a_one_line_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid choice: 'diagnose'" in err


def test_no_command_prints_help_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("milcore ")


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "milcore", "synth", "--task", "cll", "out"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice: 'cll'" in result.stderr and "Traceback" not in result.stderr
