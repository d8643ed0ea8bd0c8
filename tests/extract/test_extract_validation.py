"""Bad extraction arguments fail before any output exists, naming the option (issue 13, items 8, 9; worker failures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_cache.encoders import check_encoder_options, encoder_spec, list_encoders
from feature_cache.errors import InvalidArgumentError
from feature_cache.sources.synthetic import SynthConfig, write_cohort
from milcore.cli import main

SMALL = {"bag_median": 12, "bag_range": (10, 20)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("validation") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=3, seed=2, **SMALL), out)
    return out


def _extract(cohort: Path, out: Path, *extra: str, encoder: str = "toy") -> int:
    return main(["extract", "--source", "crops", "--input", str(cohort), "--encoder", encoder, "--out", str(out),
                 "--workers", "0", "-q", *extra])  # fmt: skip


def _nothing_created(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "no bank, journal, lock or run log"


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def _image_size(name: str):
    return encoder_spec(name).options.get("image_size")


@pytest.mark.parametrize("name", list_encoders())
@pytest.mark.parametrize("value", ["abc", "100000", "-5", "0", "96.5", "true"])
def test_bad_image_size_is_refused_by_name_before_any_output(
    name: str, value: str, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--weights", str(tmp_path / "w.safetensors")] if encoder_spec(name).requires_weights else []
    assert _extract(cohort, out / "bank.h5", "--encoder-arg", f"image_size={value}", *extra, encoder=name) == 2
    err = _one_line(capsys)
    if _image_size(name) is None:
        assert f"--encoder-arg image_size: encoder {name!r} has no option 'image_size'" in err
    else:
        assert f"--encoder-arg image_size={value}: " in err
        assert "must be" in err or "expected a whole number" in err
    _nothing_created(out)


@pytest.mark.parametrize("name", list_encoders())
def test_unknown_encoder_option_lists_the_known_ones(name: str, cohort: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert _extract(cohort, out / "bank.h5", "--encoder-arg", "colour=red", encoder=name) == 2
    err = _one_line(capsys)
    known = sorted(encoder_spec(name).options)
    assert f"--encoder-arg colour: encoder {name!r} has no option 'colour'" in err
    assert (f"its options: {', '.join(known)}" if known else "it takes none") in err
    _nothing_created(out)


@pytest.mark.parametrize("name", list_encoders())
def test_every_declared_option_accepts_its_default_and_names_itself(name: str) -> None:
    import inspect

    spec = encoder_spec(name)
    params = inspect.signature(spec.factory).parameters
    assert set(spec.options) == {p for p in params if p not in ("weights", "device")}
    for key, option in spec.options.items():
        default = params[key].default
        assert check_encoder_options(name, {key: default}) == {key: default}
        if option.kind in ("int", "float"):
            with pytest.raises(InvalidArgumentError, match=rf"^--encoder-arg {key}=nan: "):
                check_encoder_options(name, {key: "nan"}, label="--encoder-arg")


def test_good_encoder_args_are_typed_from_text() -> None:
    assert check_encoder_options("efficientnet_lite0", {"image_size": "96"}) == {"image_size": 96}
    with pytest.raises(InvalidArgumentError, match=r"image_size=100000: must be a whole number between 32 and 1024"):
        check_encoder_options("efficientnet_lite0", {"image_size": 100000})
    with pytest.raises(InvalidArgumentError, match=r"image_size=100: must be .* a multiple of 14"):
        check_encoder_options("vit_small_patch14_dinov2", {"image_size": "100"})
    with pytest.raises(InvalidArgumentError, match=r"weights_sha256=abc: must match"):
        check_encoder_options("vit_small_patch14_dinov2", {"weights_sha256": "abc"})


def test_repeated_or_malformed_encoder_arg(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["--encoder-arg", "image_size=96", "--encoder-arg", "image_size=128"]
    assert _extract(cohort, out / "b.h5", *args, encoder="efficientnet_lite0") == 2
    assert "--encoder-arg image_size: given twice" in _one_line(capsys)
    assert _extract(cohort, out / "b.h5", "--encoder-arg", "image_size", encoder="efficientnet_lite0") == 2
    assert "expected KEY=VALUE" in _one_line(capsys)
    _nothing_created(out)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "mps"])
def test_unavailable_device_fails_before_any_output(device: str, cohort: Path, tmp_path: Path, capsys) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "out"
    out.mkdir()
    assert _extract(cohort, out / "bank.h5", "--device", device) == 2
    err = _one_line(capsys)
    assert f"--device {device}" in err or f"--device {device!r}" in err
    _nothing_created(out)


def _fail_on(monkeypatch: pytest.MonkeyPatch, bag: str, how: str) -> None:
    from feature_cache.sources.crops import CropFolderSource

    real = CropFolderSource.read_bag

    def read_bag(self, bag_id: str):
        if bag_id == bag:
            if how == "exit":
                import os

                os._exit(3)  # the worker process dies (as when killed for memory)
            raise RuntimeError("can't allocate memory:\nyou tried to allocate 11310000000000 bytes")
        return real(self, bag_id)

    monkeypatch.setattr(CropFolderSource, "read_bag", read_bag)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_failure_reading_a_bag_is_one_line_naming_it_and_leaves_no_journal(
    workers: str, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    bank = out / "bank.h5"
    _fail_on(monkeypatch, "aml-0001", "raise")
    assert _extract(cohort, bank, "--workers", workers) == 2
    err = _one_line(capsys)
    assert "bag aml-0001: reading and transforming its cells failed (RuntimeError: can't allocate memory" in err
    _nothing_created(out)  # nothing was committed: no journal to block the rerun
    monkeypatch.undo()
    assert _extract(cohort, bank, "--workers", workers) == 0


def test_a_failure_after_committed_bags_keeps_them_for_the_rerun(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = tmp_path / "bank.h5"
    _fail_on(monkeypatch, "aml-0003", "raise")
    assert _extract(cohort, bank) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "bag aml-0003" in errors[0]
    assert "2 bag(s) of this run kept; a rerun resumes" in errors[0]
    assert Path(str(bank) + ".journal").is_dir()
    monkeypatch.undo()
    from feature_cache.extract import ExtractConfig, extract

    summary = extract(ExtractConfig(source="crops", input=str(cohort), encoder="toy", out=str(bank), num_workers=0))
    assert (summary.bags_skipped, summary.bags_written) == (2, 1)


def test_a_dead_worker_process_is_one_line_naming_the_bag(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _fail_on(monkeypatch, "aml-0001", "exit")
    assert _extract(cohort, out / "bank.h5", "--workers", "1") == 2
    err = _one_line(capsys)
    assert "worker process died while reading bag aml-0001" in err
    _nothing_created(out)


def test_no_readable_bag_is_an_error_and_writes_no_bank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crops = tmp_path / "crops"
    for patient in ("P1", "P2"):
        (crops / patient).mkdir(parents=True)
        (crops / patient / "c0.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    out.mkdir()
    assert _extract(crops, out / "bank.h5") == 2
    err = capsys.readouterr().err
    assert "none of the 2 bag(s) gave a cell (2 with no cell found, 2 unreadable item(s)" in err, err
    assert "no bank written" in err
    assert sorted(p.name for p in out.iterdir()) == ["bank.h5.extract.jsonl"], "only the log naming the failures"
