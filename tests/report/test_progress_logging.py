"""Issue 13 item 16: progress reaches a log when stderr is not a terminal; silence only with quiet."""

from __future__ import annotations

import io
import logging
import re

import pytest

from feature_cache import progress as progress_module
from feature_cache.progress import WorkEstimate, progress, set_quiet


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    monkeypatch.delenv("MILCORE_PROGRESS_INTERVAL", raising=False)
    set_quiet(False)
    yield
    set_quiet(False)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "feature_cache.progress"]


def test_manual_updates_log_done_total_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="feature_cache.progress"):
        bar = progress(total=10, desc="extract toy", unit="bag", interval=0)
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.512")
        bar.update(1)
        bar.close()
    lines = _lines(caplog)
    assert lines, "a log line must be emitted when stderr is not a TTY"
    line = next(m for m in lines if "4/10" in m)
    assert line.startswith("extract toy: 4/10 bag") and "40%" in line
    assert re.search(r"[0-9.]+ bag/s", line) and "ETA" in line
    assert any("5/10" in m and "loss=0.512" in m for m in lines)


def test_wrapped_iterable_and_initial(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="feature_cache.progress"):
        assert list(progress(range(3), desc="verify", unit="bag", interval=0)) == [0, 1, 2]
        bar = progress(total=5, desc="fold 1/3", unit="epoch", initial=2, interval=0)
        bar.update(1)
        bar.close()
    lines = _lines(caplog)
    assert any(m.startswith("verify: 3/3 bag") for m in lines)
    assert any("3/5 epoch" in m for m in lines)


def test_interval_from_the_environment(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILCORE_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="feature_cache.progress"):
        bar = progress(total=2, desc="audit groups", unit="group")
        bar.update(1)
        bar.close()
    assert any("1/2 group" in m for m in _lines(caplog))
    monkeypatch.setenv("MILCORE_PROGRESS_INTERVAL", "3600")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="feature_cache.progress"):
        bar = progress(total=2, desc="audit groups", unit="group")
        bar.update(1)
        bar.close()
    assert _lines(caplog) == [], "nothing before the interval has passed"


def test_bad_interval_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from feature_cache.errors import UserError

    monkeypatch.setenv("MILCORE_PROGRESS_INTERVAL", "soon")
    with pytest.raises(UserError, match="MILCORE_PROGRESS_INTERVAL"):
        progress(total=2, desc="x")


def test_quiet_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    set_quiet(True)
    with caplog.at_level(logging.INFO, logger="feature_cache.progress"):
        bar = progress(total=3, desc="x", unit="bag", interval=0)
        for _ in range(3):
            bar.update(1)
        bar.close()
        list(progress(range(3), interval=0))
    assert _lines(caplog) == []


def test_terminal_gets_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", _Tty())
    bar = progress(total=3, desc="x", unit="bag")
    assert type(bar).__module__.startswith("tqdm") and not bar.disable
    bar.close()
    assert progress_module.progress_mode() == "bar"
    set_quiet(True)
    assert progress_module.progress_mode() == "off"


def test_work_estimate_announces_size_then_duration(caplog: pytest.LogCaptureFixture) -> None:
    clock = iter([100.0, 104.0])
    with caplog.at_level(logging.INFO, logger="feature_cache.progress"):
        est = WorkEstimate(12, "training", "bench: 3 models x 2 folds x 2 seeds", clock=lambda: next(clock))
        est.start()
        est.done()
        est.done()
    lines = _lines(caplog)
    assert lines[0].startswith("bench: 3 models x 2 folds x 2 seeds = 12 trainings")
    assert any("first training took 4" in m and "0:00:44" in m for m in lines), lines
    assert len(lines) == 2, "the duration estimate is given once, after the first unit"


def test_cli_shows_progress_in_a_log_and_is_silent_with_q(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from milcore.cli import main

    monkeypatch.setenv("MILCORE_PROGRESS_INTERVAL", "0")
    argv = ["synth", "--task", "aml", "--patients", "3", "--seed", "0", "--bag-median", "12", "--bag-min", "10"]
    assert main([*argv, str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("synth aml:")]
    assert lines and all("cells/s" in line and "ETA" in line for line in lines), err
    assert main(["-q", *argv, str(tmp_path / "b")]) == 0
    assert "synth aml:" not in capsys.readouterr().err
