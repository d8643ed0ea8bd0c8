"""Crash safety: a real writer subprocess is SIGKILLed mid-bag, mid-close and mid-rename.

The child writes deterministic bags (bag ``i`` is generated from seed ``i``) and prints each bag
id once ``append`` has returned. A patched sink/finalizer pauses at the chosen point and prints
``PAUSED``; the parent then kills it with SIGKILL. Afterwards the previous bank must still be
readable, and reopening the writer in append mode must keep exactly the committed bags.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import BankFormatError, EncoderInfo, open_reader, open_writer
from feature_cache.bank.journal import journal_dir
from feature_cache.bank.verify import verify_bank

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
INFO = EncoderInfo("crash", "1", "", "none", 8)

CHILD = textwrap.dedent(
    """
    import sys, time, numpy as np
    from feature_cache.bank import EncoderInfo, open_writer
    from feature_cache.bank import sinks, hdf5

    path, mode, first, last, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    info = EncoderInfo("crash", "1", "", "none", 8)

    def hold():
        print("PAUSED", flush=True)
        time.sleep(120)

    if pause.startswith("bag"):  # write half of this bag's rows, then stop before its commit line
        target = int(pause[3:])
        for cls in (sinks.RawSink, sinks.ChunkSink):
            original = cls.append
            def append(self, rows, _original=original):
                if len(rows) == 40 + target:
                    _original(self, rows[: len(rows) // 2])
                    hold()
                _original(self, rows)
            cls.append = append
    elif pause == "finalize":  # rows and metadata half-assembled
        import os
        def splice(side, dest, offset, nbytes):
            head = open(side, "rb").read(offset // 2)
            fd = os.open(dest, os.O_RDWR)
            os.pwrite(fd, head, 0)  # half of the HDF5 header spliced in, no tail yet
            os.close(fd)
            hold()
        hdf5._splice = splice
    elif pause == "rename":  # Zarr: old store moved aside, new one not yet in place
        import os
        original_rename = os.rename
        def rename(src, dst):
            original_rename(src, dst)
            if str(dst).endswith("old.zarr"):
                hold()
        os.rename = rename

    def bag(i):
        rng = np.random.default_rng(i)
        return rng.standard_normal((40 + i, 8)).astype(np.float32), rng.integers(0, 999, (40 + i, 2))

    w = open_writer(path, info, mode)
    for i in range(first, last):
        if w.has(f"bag{i:03d}"):
            continue
        x, c = bag(i)
        w.append(f"bag{i:03d}", x, c, meta={"i": i})
        print(f"bag{i:03d}", flush=True)
    w.close()
    print("CLOSED", flush=True)
    """
)


def _bag(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal((40 + i, 8)).astype(np.float32).astype(np.float16)


def _run_and_kill(path: Path, mode: str, first: int, last: int, pause: str, tmp: Path) -> list[str]:
    """Run the child until it prints PAUSED (or a random delay for pause='random'), SIGKILL it."""
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), mode, str(first), str(last), pause],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    committed: list[str] = []
    assert proc.stdout is not None
    if pause == "random":
        deadline = None
        for line in proc.stdout:
            committed.append(line.strip())
            if deadline is None:
                deadline = time.monotonic() + random.uniform(0.0, 0.4)
            if time.monotonic() >= deadline:
                break
    else:
        for line in proc.stdout:
            if line.strip() == "PAUSED":
                break
            committed.append(line.strip())
        else:
            proc.wait()
            pytest.fail(f"child ended without pausing: {proc.stderr.read() if proc.stderr else ''}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL or pause == "random"
    return [c for c in committed if c.startswith("bag")]


def _resume_and_check(path: Path, committed: list[str], upto: int) -> None:
    with open_writer(path, INFO, mode="a") as writer:
        for bag_id in committed:
            assert writer.has(bag_id), bag_id
        for i in range(upto):
            if not writer.has(f"bag{i:03d}"):
                writer.append(f"bag{i:03d}", _bag(i), meta={"i": i})
    with open_reader(path) as reader:
        assert reader.bag_ids() == [f"bag{i:03d}" for i in range(upto)]
        for i in range(upto):
            np.testing.assert_array_equal(reader.read(f"bag{i:03d}"), _bag(i))
        assert reader.bag_meta["i"].tolist() == list(range(upto))
    assert verify_bank(path).ok
    assert not journal_dir(path).exists()


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_kill_mid_bag_of_first_write(tmp_path, suffix):
    path = tmp_path / f"bank{suffix}"
    committed = _run_and_kill(path, "x", 0, 12, "bag5", tmp_path)
    assert committed == [f"bag{i:03d}" for i in range(5)]
    with pytest.raises(BankFormatError, match=r"interrupted write.*5 bags committed.*no finished bank"):
        open_reader(path)  # nothing finished yet: no half bank is ever visible
    report = verify_bank(path)
    assert report.unfinished_write and report.unfinished_write["committed_bags"] == 5
    _resume_and_check(path, committed, 12)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_kill_mid_bag_while_appending_keeps_the_old_bank(tmp_path, suffix):
    path = tmp_path / f"bank{suffix}"
    with open_writer(path, INFO) as writer:
        for i in range(4):
            writer.append(f"bag{i:03d}", _bag(i), meta={"i": i})
    committed = _run_and_kill(path, "a", 4, 12, "bag7", tmp_path)
    assert committed == ["bag004", "bag005", "bag006"]
    with open_reader(path) as reader:  # the finished bank is untouched
        assert len(reader) == 4 and verify_bank(path).ok
    _resume_and_check(path, committed, 12)


def test_kill_while_closing_hdf5(tmp_path):
    path = tmp_path / "bank.h5"
    with open_writer(path, INFO) as writer:
        writer.append("bag000", _bag(0), meta={"i": 0})
    committed = _run_and_kill(path, "a", 1, 6, "finalize", tmp_path)
    assert len(committed) == 5
    with open_reader(path) as reader:
        assert reader.bag_ids() == ["bag000"]
    _resume_and_check(path, committed, 6)


def test_kill_between_zarr_renames(tmp_path):
    path = tmp_path / "bank.zarr"
    with open_writer(path, INFO) as writer:
        writer.append("bag000", _bag(0), meta={"i": 0})
    committed = _run_and_kill(path, "a", 1, 5, "rename", tmp_path)
    assert not path.exists()  # the one window where the bank is away; the journal knows
    _resume_and_check(path, committed, 5)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_kill_at_random_moments(tmp_path, suffix):
    random.seed(7)
    path = tmp_path / f"bank{suffix}"
    last = 1500
    all_committed: set[str] = set()
    for round_ in range(5):
        committed = _run_and_kill(path, "a", 0, last, "random", tmp_path)
        all_committed.update(committed)
        with open_writer(path, INFO, mode="a") as writer:
            assert all(writer.has(c) for c in all_committed), round_
        with open_reader(path) as reader:
            for bag_id in reader.bag_ids():
                np.testing.assert_array_equal(reader.read(bag_id), _bag(int(bag_id[3:])))
        assert verify_bank(path).ok
    assert len(all_committed) > 0
    with open_reader(path) as reader:
        assert len(reader) >= len(all_committed)
