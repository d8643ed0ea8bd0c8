"""Registry, config validation and the trainer hook."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from feature_cache.errors import InvalidArgumentError
from milcore.models import (
    AggregatorConfig,
    EpochContext,
    MILAggregator,
    MILOutput,
    aggregator_needs,
    control_class_of,
    create_aggregator,
    get_aggregator_entry,
    list_aggregators,
    register_aggregator,
)
from milcore.models.registry import REGISTRY

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_list_with_wildcards_is_sorted() -> None:
    assert list_aggregators("*mil") == ["abmil", "acmil", "amil", "dsmil", "graphmil", "transmil"]
    assert list_aggregators("clam_*") == ["clam_mb", "clam_sb"]
    assert list_aggregators("m*") == ["max", "mean"]
    assert list_aggregators("nothing*") == []
    assert list_aggregators() == sorted(list_aggregators())


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown aggregator 'abmill'; did you mean 'abmil'"):
        create_aggregator("abmill", in_dim=8, num_classes=2)
    with pytest.raises(InvalidArgumentError, match="registered: abmil, acmil, amil, clam_mb, clam_sb"):
        get_aggregator_entry("zzz")


def test_duplicate_name_is_an_error() -> None:
    @dataclass(frozen=True)
    class Cfg(AggregatorConfig):
        pass

    class Dup(MILAggregator):
        def pool(self, x, ptr, index, coords, labels):
            raise NotImplementedError

    with REGISTRY.scoped(), pytest.raises(InvalidArgumentError, match=r"aggregator 'abmil' is already registered "
                                                                    r"\(by milcore\.models\.abmil\.ABMIL\)"):
        register_aggregator("abmil", config=Cfg)(Dup)  # before the built-in abmil was ever imported
    assert get_aggregator_entry("abmil").model_class.__name__ == "ABMIL"


class _Pooled(MILAggregator):
    """A test aggregator."""

    def pool(self, x, ptr, index, coords, labels) -> MILOutput:
        return MILOutput(x.new_zeros(ptr.numel() - 1, self.num_classes), x.new_ones(x.shape[0]), x[:0])


def test_register_refuses_what_breaks_the_contract_naming_it() -> None:
    @dataclass
    class Mutable:
        in_dim: int
        num_classes: int

    @dataclass(frozen=True)
    class Cfg(AggregatorConfig):
        width: int = 3

    with REGISTRY.scoped():
        with pytest.raises(InvalidArgumentError, match=r"config of aggregator '_mutable_test' must be a "
                                                       r"@dataclass\(frozen=True\).*Mutable"):
            register_aggregator("_mutable_test", config=Mutable)(_Pooled)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match=r"'_not_a_module'.*'N' must subclass MILAggregator"):
            register_aggregator("_not_a_module", config=Cfg)(type("N", (), {}))

        class NoPool(MILAggregator):
            pass

        with pytest.raises(InvalidArgumentError, match="NoPool does not implement pool"):
            register_aggregator("_no_pool", config=Cfg)(NoPool)
        with pytest.raises(InvalidArgumentError, match="name must be letters"):
            register_aggregator("a,b", config=Cfg)(_Pooled)
        assert not list_aggregators("_*")


def test_forward_is_final() -> None:
    """The base class does the checks and the bookkeeping: an aggregator writes only its pooling."""
    with pytest.raises(InvalidArgumentError, match=r"OwnForward overrides MILAggregator\.forward.*implement pool"):

        class OwnForward(MILAggregator):
            def forward(self, x, ptr, coords=None, labels=None):  # type: ignore[override]
                return None

    with pytest.raises(InvalidArgumentError, match=r"forward_padded.*pool_padded"):

        class OwnPadded(_Pooled):
            def forward_padded(self, x, mask, coords=None, labels=None):  # type: ignore[override]
                return None


def test_new_models_are_created_and_the_base_checks_their_output() -> None:
    @dataclass(frozen=True)
    class Cfg(AggregatorConfig):
        width: int = 3

    with REGISTRY.scoped():

        @register_aggregator("_tiny_test", config=Cfg)
        class Tiny(_Pooled):
            """A tiny test aggregator."""

        model = create_aggregator("_tiny_test", in_dim=4, num_classes=2, width=5)
        assert isinstance(model, Tiny) and model.config.width == 5 and "_tiny_test" in list_aggregators("_*")
        assert get_aggregator_entry("_tiny_test").summary == "A tiny test aggregator."
        assert not model.has_padded_path and aggregator_needs("_tiny_test").padded is False
        with pytest.raises(InvalidArgumentError, match=r"_tiny_test: output breaks the MILOutput contract: "
                                                       r"embedding \(0, 4\) \(expected \(2, E\)\)"):
            model(torch.randn(5, 4), torch.tensor([0, 2, 5]))  # _Pooled returns an empty embedding
        with pytest.raises(InvalidArgumentError, match="x must be a"):
            model(torch.randn(5), torch.tensor([0, 5]))  # the base checks inputs before pool
    assert "_tiny_test" not in list_aggregators()


def test_needs_are_declared_by_the_models_not_chosen_by_name() -> None:
    assert aggregator_needs("graphmil").coords and not aggregator_needs("abmil").coords
    assert aggregator_needs("amil").control_class == "normal_class"
    assert aggregator_needs("amil").hooks == {"control_instances"}
    assert {n for n in list_aggregators() if aggregator_needs(n).padded} == {"abmil", "max", "mean", "transmil"}
    assert [n for n in list_aggregators() if not aggregator_needs(n).permutation_invariant] == ["transmil"]
    assert [n for n in list_aggregators() if not aggregator_needs(n).casts_input_first] == ["graphmil"]  # kNN on x
    amil = create_aggregator("amil", in_dim=4, num_classes=3, normal_class=2)
    assert control_class_of(amil) == 2 and control_class_of(create_aggregator("abmil", in_dim=4, num_classes=2)) == 0
    assert aggregator_needs(torch.nn.Linear(2, 2)) == aggregator_needs(torch.nn.Module)  # a plain module needs nothing
    for name in list_aggregators():  # the entry's metadata is what the class declares
        assert get_aggregator_entry(name).needs == aggregator_needs(create_aggregator(name, in_dim=4, num_classes=2))


def test_listing_imports_neither_torch_nor_the_models() -> None:
    code = ("import sys; from milcore.models import list_aggregators; names = list_aggregators(); "
            "print(len(names) >= 7, 'torch' in sys.modules, 'milcore.models.abmil' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


def test_unknown_config_field_is_named_with_a_hint() -> None:
    with pytest.raises(InvalidArgumentError, match=r"'atention_dim' \(did you mean 'attention_dim'\?\)"):
        create_aggregator("abmil", in_dim=8, num_classes=2, atention_dim=4)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("abmil", {"in_dim": 0}, "in_dim must be >= 1"),
        ("abmil", {"num_classes": 1}, "num_classes must be >= 2"),
        ("abmil", {"in_dim": 8.0}, "in_dim must be a whole number"),
        ("abmil", {"gated": True, "dropout": 1.5}, r"dropout must be in \[0.0, 0.99\]"),
        ("mean", {"embed_dim": True}, "embed_dim must be a whole number"),
        ("graphmil", {"conv": "sage"}, "conv must be one of 'gcn', 'gat', 'gin'"),
        ("graphmil", {"conv": "gat", "embed_dim": 10, "heads": 4}, "divisible by heads"),
        ("transmil", {"dim": 30, "num_heads": 4}, "divisible by num_heads"),
        ("transmil", {"num_layers": 1}, "num_layers must be >= 2"),
        ("amil", {"normal_class": 2}, r"normal_class must be in \[0, 1\]"),
        ("dsmil", {"max_loss_weight": -1.0}, "max_loss_weight must be >= 0"),
    ],
)
def test_invalid_config_values(name: str, overrides: dict, message: str) -> None:
    kwargs = {"in_dim": 8, "num_classes": 2, **overrides}
    with pytest.raises(InvalidArgumentError, match=message):
        create_aggregator(name, **kwargs)


def test_configs_are_frozen_and_carry_in_dim_and_num_classes() -> None:
    for name in list_aggregators():
        model = create_aggregator(name, in_dim=8, num_classes=3)
        assert model.config.in_dim == 8 and model.config.num_classes == 3 and model.aggregator_name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            model.config.in_dim = 4  # type: ignore[misc]
        rebuilt = create_aggregator(name, **dataclasses.asdict(model.config))  # checkpoint-style rebuild
        assert rebuilt.config == model.config


def test_importing_milcore_registers_nothing() -> None:
    code = "import sys, milcore, milcore.ops, milcore.data; print('milcore.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_epoch_hook_is_generic_and_lazy() -> None:
    """A trainer calls ``on_epoch_start`` on any model; the control sampler runs only if required."""
    calls = []

    def control() -> torch.Tensor:
        calls.append(1)
        return torch.randn(50, 8)

    for name in list_aggregators():
        model = create_aggregator(name, in_dim=8, num_classes=2)
        needs = "control_instances" in model.hook_requirements
        model.on_epoch_start(EpochContext(0, control_instances=control if needs else None))
    assert len(calls) == 1  # only AMiL asked for control cells
    amil = create_aggregator("amil", in_dim=8, num_classes=2, refit_every=2)
    amil.on_epoch_start(EpochContext(1, control_instances=control))
    assert not bool(amil.fitted) and len(calls) == 1  # not an epoch to refit on
    amil.on_epoch_start(EpochContext(2, control_instances=control))
    assert bool(amil.fitted) and len(calls) == 2


def test_amil_refreshes_its_gaussian_online_from_control_bags() -> None:
    torch.manual_seed(0)
    model = create_aggregator("amil", in_dim=8, num_classes=2, embed_dim=16).train()
    x, ptr = torch.randn(30, 8), torch.tensor([0, 10, 20, 30])
    model(x, ptr)  # no labels: nothing to learn the normal cells from
    assert not bool(model.fitted)
    model(x, ptr, labels=torch.tensor([1, 0, 1]))
    assert bool(model.fitted)
    mean = model.normal_mean.clone()
    model(x + 1.0, ptr, labels=torch.tensor([0, 0, 1]))
    assert not torch.allclose(model.normal_mean, mean)  # moved toward the new control cells
    model.eval()
    frozen = model.normal_mean.clone()
    model(x + 5.0, ptr, labels=torch.tensor([0, 0, 1]))
    assert torch.equal(model.normal_mean, frozen)  # eval mode never updates statistics
    with pytest.raises(InvalidArgumentError, match=r"expected \(M, 8\)"):
        model.fit_normal(torch.randn(5, 7))


def test_amil_fits_control_cells_whose_spread_is_small_beside_their_mean(caplog: pytest.LogCaptureFixture) -> None:
    """E[hh^T] - mu mu^T in float32 lost such cells' covariance (Cholesky failed, every refit was skipped with a
    warning, so the anomaly scores stayed 0); the statistics are now central and the whitening is right."""
    torch.manual_seed(0)
    model = create_aggregator("amil", in_dim=16, num_classes=2, embed_dim=32, shrinkage=0.01)
    with torch.no_grad():
        model.embed[0].weight.copy_(torch.eye(32, 16))  # embed = the features themselves (and 16 dead units)
        model.embed[0].bias.zero_()
    x = 100.0 + 0.03 * torch.randn(4000, 16)
    with caplog.at_level("WARNING", logger="milcore.models.amil"):
        model.fit_normal(x)
    assert bool(model.fitted) and not caplog.records
    h = model.embed(x)[:, :16]
    z = (h - model.normal_mean[:16]) @ model.whitening[:16, :16].T
    cov = z.T @ z / len(z)  # whitened control cells: unit covariance (up to the shrinkage of 1 %)
    assert torch.allclose(cov, torch.eye(16), atol=0.05)
    anomaly = model.anomaly_scores(model.embed(x + 0.3))  # 10 standard deviations off in every feature
    assert float(anomaly.mean()) > 10


def test_amil_online_statistics_equal_the_running_second_moment_and_old_checkpoints_load() -> None:
    torch.manual_seed(1)
    model = create_aggregator("amil", in_dim=8, num_classes=2, embed_dim=16, momentum=0.7).train()
    x, ptr, labels = torch.randn(30, 8), torch.tensor([0, 10, 20, 30]), torch.tensor([0, 0, 1])
    h = [model.embed(x)[:20].detach().double()]
    model(x, ptr, labels=labels)
    h.append(model.embed(x + 1.0)[:20].detach().double())
    model(x + 1.0, ptr, labels=labels)
    mean = 0.7 * h[0].mean(0) + 0.3 * h[1].mean(0)
    second = 0.7 * (h[0].T @ h[0]) / 20 + 0.3 * (h[1].T @ h[1]) / 20
    assert torch.allclose(model.normal_mean.double(), mean, atol=1e-5)
    assert torch.allclose(model.normal_cov.double(), second - torch.outer(mean, mean), atol=1e-4)
    state = model.state_dict()  # as written before the statistics were kept central
    del state["normal_cov"]
    state["normal_second"] = second.float()
    fresh = create_aggregator("amil", in_dim=8, num_classes=2, embed_dim=16, momentum=0.7)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh.normal_cov, model.normal_cov, atol=1e-4)


def test_an_amil_checkpoint_of_the_earlier_version_loads(tmp_path) -> None:
    """A saved checkpoint with the old buffer passes the exact tensor check through ``upgrade_state``."""
    import json

    from safetensors.torch import save_file

    from milcore.training.checkpoint import CARD, WEIGHTS, card_sha256, file_sha256, load_checkpoint, save_checkpoint

    torch.manual_seed(2)
    model = create_aggregator("amil", in_dim=8, num_classes=2, embed_dim=16).train()
    model(torch.randn(30, 8), torch.tensor([0, 10, 20, 30]), labels=torch.tensor([0, 0, 1]))
    folder = save_checkpoint(tmp_path / "fold", model.eval(), classes=["a", "b"], encoder=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    mean = state["normal_mean"].double()
    state["normal_second"] = (state.pop("normal_cov").double() + torch.outer(mean, mean)).float()
    save_file(state, str(folder / WEIGHTS))
    card = json.loads((folder / CARD).read_text())
    card["weights_sha256"] = file_sha256(folder / WEIGHTS)
    card["card_sha256"] = card_sha256(card)
    (folder / CARD).write_text(json.dumps(card))
    loaded, _ = load_checkpoint(folder)
    assert torch.allclose(loaded.normal_cov, model.normal_cov, atol=1e-4)
    x, ptr = torch.randn(12, 8), torch.tensor([0, 5, 12])
    assert torch.allclose(loaded(x, ptr).logits, model(x, ptr).logits, atol=1e-4)
