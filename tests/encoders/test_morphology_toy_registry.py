"""The morphology and toy encoders on real cells, and the encoder registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feature_cache.encoders import create_encoder, encoder_spec, list_encoders, register_encoder
from feature_cache.encoders import registry as reg
from feature_cache.encoders.morphology import FEATURE_NAMES
from feature_cache.errors import InvalidArgumentError, UserError


def _col(feats: np.ndarray, name: str) -> np.ndarray:
    return feats[:, FEATURE_NAMES.index(name)]


def test_morphology_separates_real_cell_types(mnist_cells: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = mnist_cells
    enc = create_encoder("morphology")
    feats = enc.encode(x)
    assert feats.shape == (len(x), len(FEATURE_NAMES)) == (len(x), enc.dim)
    lymph, neutro, platelet = (y == 4), (y == 6), (y == 7)
    assert _col(feats, "nc_ratio")[lymph].mean() > _col(feats, "nc_ratio")[neutro].mean()  # lymphocytes: high N:C
    assert _col(feats, "nucleus_lobularity")[neutro].mean() > _col(feats, "nucleus_lobularity")[lymph].mean()
    assert _col(feats, "nucleus_area")[platelet].mean() < 0.5 * _col(feats, "nucleus_area")[neutro].mean()
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    assert (y[sim.argmax(1)] == y).mean() > 0.5  # 1-NN over 8 classes (chance 0.125)


def test_morphology_on_glass_and_fields(bccd_dir: Path) -> None:
    from feature_cache.sources import create_source

    enc = create_encoder("morphology")
    glass = enc.encode([np.full((64, 64, 3), 220, np.uint8)])
    assert np.isfinite(glass).all() and _col(glass, "nucleus_area")[0] == 0
    assert _col(glass, "glass_fraction")[0] == 1.0
    wbc = create_source("fields", bccd_dir / "JPEGImages" / "BloodImage_00000.jpg").read_bag("BloodImage_00000")
    rbc = create_source("fields", bccd_dir / "JPEGImages" / "BloodImage_00000.jpg", cells="rbc")
    fw, fr = enc.encode(wbc), enc.encode(rbc.read_bag("BloodImage_00000"))
    assert _col(fw, "nucleus_area")[0] > 0.1 and 0 < _col(fw, "nc_ratio")[0] <= 1
    assert _col(fr, "nucleus_area").mean() < 0.02 < _col(fr, "red_cell_fraction").mean()


def test_toy_is_a_fixed_function_of_the_pixels(crops: list[np.ndarray]) -> None:
    a = create_encoder("toy").encode(crops)
    b = create_encoder("toy", device="cpu").encode([c.copy() for c in crops])
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(crops), 32) and np.abs(a).max() < 1
    gray = create_encoder("toy").encode([np.full((16, 16, 3), 127, np.uint8)])
    assert np.abs(gray).max() < 0.05  # near-zero input, near-zero output


def test_weight_free_encoders_refuse_weights(tmp_path: Path) -> None:
    for name in ("toy", "morphology"):
        with pytest.raises(InvalidArgumentError, match="takes no weights"):
            create_encoder(name, weights=tmp_path / "w.pth")


@pytest.fixture
def extra_encoder() -> Iterator[None]:
    with reg.REGISTRY.scoped():

        @register_encoder("tiny_test_encoder")
        def tiny(weights: object = None, device: object = None, width: int = 2):
            enc = create_encoder("toy", device=device)
            enc.name = f"tiny{width}"
            return enc

        yield
    assert "tiny_test_encoder" not in list_encoders()


def test_registry_create_list_and_errors(extra_encoder: None) -> None:
    assert "tiny_test_encoder" in list_encoders() and list_encoders("tiny_*") == ["tiny_test_encoder"]
    assert create_encoder("tiny_test_encoder", width=3).name == "tiny3"
    with pytest.raises(InvalidArgumentError, match=r"has no option 'depth' \(its options: width\)"):
        create_encoder("tiny_test_encoder", depth=3)
    with pytest.raises(InvalidArgumentError, match=r"unknown encoder 'vit_huge' \(registered: .*vit_small_patch14"):
        create_encoder("vit_huge")
    with pytest.raises(InvalidArgumentError, match=r"unknown encoder 'vit_small'; did you mean 'vit_small_patch14_"):
        encoder_spec("vit_small")

    def other(weights: object = None, device: object = None) -> None:
        return None

    with pytest.raises(InvalidArgumentError, match=r"encoder 'tiny_test_encoder' is already registered \(by .*tiny\)"):
        register_encoder("tiny_test_encoder")(other)
    assert encoder_spec("vit_small_patch14_dinov2").requires_weights
    assert not encoder_spec("efficientnet_lite0").requires_weights
    with pytest.raises(UserError, match="needs a local weights file"):
        create_encoder("vit_base_patch14_dinov2")


def test_register_refuses_a_factory_without_the_protocol() -> None:
    with reg.REGISTRY.scoped():
        with pytest.raises(InvalidArgumentError, match=r"'no_device': factory .*no_device_factory must take device="):

            @register_encoder("no_device")
            def no_device_factory(weights: object = None) -> None:
                return None

        with pytest.raises(InvalidArgumentError, match="is not a callable factory"):
            register_encoder("not_callable")(42)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="declares options its factory does not take: depth"):
            from feature_cache.encoders import EncoderOption

            register_encoder("stray", options=[EncoderOption("depth", "int")])(lambda weights=None, device=None: None)
        assert not {"no_device", "not_callable", "stray"} & set(list_encoders())


def test_options_are_the_entry_metadata() -> None:
    spec = encoder_spec("efficientnet_lite0")
    assert reg.REGISTRY.entry("efficientnet_lite0").metadata["options"] is spec.options
    assert spec.options["image_size"].kind == "int"


def test_importing_encoders_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, feature_cache.encoders as e; n = e.list_encoders(); "
            "print('torch' in sys.modules, 'feature_cache.encoders.vit' in sys.modules, len(n) >= 6)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]
