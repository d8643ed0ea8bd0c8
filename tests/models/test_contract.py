"""The aggregator contract, checked for every registered aggregator (timm style: register -> tested).

Each ``check_*`` function takes a registered name and checks one part of the contract; :data:`CHECKS`
lists them and ``test_contract`` runs every check on every aggregator (the plug-in test reuses them on
a throwaway aggregator). Known exception, declared by the model itself: TransMIL is not permutation
invariant (PPEG depends on the order of the cells); the check verifies the declaration is true.

``python tests/models/test_contract.py`` prints the measured bfloat16-vs-float32 logit error of every
aggregator on CPU (the source of :data:`BF16_ATOL`).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from feature_cache.errors import InvalidArgumentError
from milcore.models import MILAggregator, MILOutput, create_aggregator, list_aggregators
from milcore.ops import segment_sum, to_padded

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

NAMES = list_aggregators()
D, C = 12, 3
SIZES = [3, 1, 17, 8]
# small widths keep the whole file fast; every code path stays the same
SMALL = {"transmil": {"dim": 32, "num_heads": 4}, "graphmil": {"k": 4}}


def build(name: str, seed: int = 0, **overrides) -> MILAggregator:
    torch.manual_seed(seed)
    return create_aggregator(name, in_dim=D, num_classes=C, **{**SMALL.get(name, {}), **overrides})


def make_batch(sizes: list[int], seed: int = 1, dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return torch.randn(int(ptr[-1]), dim, generator=g), ptr


def assert_sums_to_one(att: torch.Tensor, ptr: torch.Tensor, skip_empty: bool = False) -> None:
    """Every attention column sums to 1 within every bag (float64 sums of the float32 weights)."""
    sums = segment_sum(att.detach().double(), ptr)  # (B,) or (B, H)
    if skip_empty:
        sums = sums[ptr[1:] > ptr[:-1]]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0.0)


def fitted(model: MILAggregator, x: torch.Tensor) -> MILAggregator:
    """AMiL needs a control Gaussian for its anomaly path to be exercised; other models are returned as is."""
    if hasattr(model, "fit_normal"):
        model.fit_normal(x)
    return model


#: bfloat16 tolerance of the logits: ~3x the largest error measured on CPU over 10 seeds (bf16_errors():
#: 0.0018-0.0067 for every aggregator but AMiL, whose Mahalanobis anomaly amplifies the bf16 error of the
#: embedding: 0.036, tolerance ~2x). Mixed-up bags or a dead head differ by >= 0.12 (checked in the test).
BF16_ATOL_DEFAULT = 0.02
BF16_ATOL = {"amil": 0.08}


def test_every_aggregator_is_listed() -> None:
    assert {"mean", "max", "abmil", "amil", "transmil", "graphmil", "dsmil"} <= set(NAMES)


def check_output_shapes_and_attention_sums_to_one(name: str) -> None:
    x, ptr = make_batch(SIZES)
    model = fitted(build(name), x).eval()
    out = model(x, ptr)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (len(SIZES), C)
    assert out.attention.shape[0] == x.shape[0] and out.attention.dim() in (1, 2)
    assert out.attention.dtype == torch.float32
    assert out.embedding.dim() == 2 and out.embedding.shape[0] == len(SIZES)
    assert isinstance(out.aux_losses, dict) and isinstance(out.instance_scores, dict)
    assert (out.attention >= 0).all()
    assert_sums_to_one(out.attention, ptr)
    for value in out.instance_scores.values():
        assert value.shape[0] == x.shape[0]


def check_batch_invariance(name: str) -> None:
    """A bag scores the same alone and inside a batch of other bags."""
    x, ptr = make_batch(SIZES)
    model = fitted(build(name), x).eval()
    with torch.no_grad():
        out = model(x, ptr)
        for b, n in enumerate(SIZES):
            rows = slice(int(ptr[b]), int(ptr[b + 1]))
            alone = model(x[rows], torch.tensor([0, n]))
            torch.testing.assert_close(alone.logits[0], out.logits[b], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone.embedding[0], out.embedding[b], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone.attention, out.attention[rows], atol=1e-6, rtol=1e-4)


def check_permutation_invariance_where_declared(name: str) -> None:
    x, ptr = make_batch(SIZES)
    model = fitted(build(name), x).eval()
    g = torch.Generator().manual_seed(3)
    perm = torch.cat([torch.randperm(n, generator=g) + int(ptr[b]) for b, n in enumerate(SIZES)])
    with torch.no_grad():
        out, shuffled = model(x, ptr), model(x[perm], ptr)
    if model.permutation_invariant:
        torch.testing.assert_close(shuffled.logits, out.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shuffled.attention, out.attention[perm], atol=1e-6, rtol=1e-4)
    else:  # the declaration must be true: order matters (TransMIL's PPEG)
        assert not torch.allclose(shuffled.logits, out.logits, atol=1e-6)


def check_ptr_path_equals_padded_path(name: str) -> None:
    model = build(name).eval()
    if not model.has_padded_path:
        with pytest.raises(NotImplementedError, match="no padded path"):  # declared, and true
            model.forward_padded(*to_padded(*make_batch(SIZES)))
        return
    x, ptr = make_batch([*SIZES, 0])
    dense, mask = to_padded(x, ptr)
    with torch.no_grad():
        packed, padded = model(x, ptr), model.forward_padded(dense, mask)
    torch.testing.assert_close(padded.logits, packed.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.embedding, packed.embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.attention, packed.attention, atol=1e-6, rtol=1e-4)


def check_every_parameter_gets_a_gradient(name: str) -> None:
    x, ptr = make_batch(SIZES)
    model = fitted(build(name), x).train()
    labels = torch.tensor([0, 1, 2, 1])
    out = model(x, ptr, labels=labels)
    loss = F.cross_entropy(out.logits.float(), labels) + sum(out.aux_losses.values())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


def check_reset_head_keeps_old_rows(name: str, **overrides) -> None:
    model = build(name, **overrides)
    x, ptr = make_batch(SIZES)
    model = fitted(model, x).eval()
    with torch.no_grad():
        before = model(x, ptr).logits
        model.reset_head(C + 2)
        grown = model(x, ptr)
        assert grown.logits.shape == (len(SIZES), C + 2) and model.config.num_classes == C + 2
        torch.testing.assert_close(grown.logits[:, :C], before, atol=1e-5, rtol=1e-4)
        assert_sums_to_one(grown.attention, ptr)
        model.reset_head(2)  # shrinking keeps the first rows (DSMIL's bag head mixes classes, so only shapes)
        assert model(x, ptr).logits.shape == (len(SIZES), 2)
    with pytest.raises(InvalidArgumentError):
        model.reset_head(1)


def check_bags_of_one_and_of_5000_instances(name: str) -> None:
    model = build(name, **({"dim": 64, "num_heads": 4} if name == "transmil" else {}))
    x, ptr = make_batch([1, 5000, 1], dim=D)
    out = fitted(model, x[:2000]).train()(x, ptr, labels=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.logits).all()
    att = out.attention if out.attention.dim() == 2 else out.attention.unsqueeze(1)
    torch.testing.assert_close(att[0], torch.ones_like(att[0]))
    assert_sums_to_one(out.attention, ptr)
    (out.logits.sum() + sum(out.aux_losses.values(), torch.tensor(0.0))).backward()


def check_empty_bags_are_defined(name: str) -> None:
    """Empty bags own no rows, get finite logits and never disturb the other bags."""
    x, ptr = make_batch([0, 4, 0, 6, 0])
    model = fitted(build(name), x).eval()
    with torch.no_grad():
        out = model(x, ptr)
        rest = model(x, torch.tensor([0, 4, 10]))
        only_empty = model(x[:0], torch.tensor([0, 0]))
    assert torch.isfinite(out.logits).all() and torch.isfinite(only_empty.logits).all()
    torch.testing.assert_close(out.logits[[1, 3]], rest.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[0], only_empty.logits[0], atol=1e-5, rtol=1e-4)
    assert only_empty.attention.shape[0] == 0 and out.attention.shape[0] == x.shape[0]
    assert_sums_to_one(out.attention, ptr, skip_empty=True)


def check_bad_inputs_raise_clear_errors(name: str) -> None:
    model = build(name).eval()
    x, ptr = make_batch(SIZES)
    with pytest.raises(InvalidArgumentError, match=rf"in_dim={D}.*dim {D + 1}"):
        model(torch.randn(x.shape[0], D + 1), ptr)
    bad = x.clone()
    bad[5, 2] = float("nan")
    with pytest.raises(InvalidArgumentError, match=r"NaN.*row 5, bag 2"):
        model(bad, ptr)
    with pytest.raises(InvalidArgumentError, match="ptr"):
        model(x, torch.tensor([0, 5, 3, x.shape[0]]))
    with pytest.raises(InvalidArgumentError, match="labels"):
        model(x, ptr, labels=torch.tensor([0, 1, 2, C]))
    if model.has_padded_path:
        dense, mask = to_padded(bad, ptr)
        with pytest.raises(InvalidArgumentError, match=r"NaN.*bag 2, slot 1"):
            model.forward_padded(dense, mask)
        with pytest.raises(InvalidArgumentError, match=rf"in_dim={D}"):
            model.forward_padded(dense[..., :-1], mask)


def check_state_dict_round_trip(name: str) -> None:
    x, ptr = make_batch(SIZES)
    model = fitted(build(name, seed=0), x).eval()
    clone = build(name, seed=1).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone(x, ptr).logits, model(x, ptr).logits)


def check_bf16_autocast_keeps_the_contract(name: str) -> None:
    x, ptr = make_batch(SIZES)
    model = fitted(build(name), x).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, ptr)
    with torch.no_grad():
        ref = model(x, ptr)
    assert out.attention.dtype == torch.float32
    assert_sums_to_one(out.attention, ptr)
    atol = BF16_ATOL.get(name, BF16_ATOL_DEFAULT)
    torch.testing.assert_close(out.logits.float(), ref.logits, atol=atol, rtol=0.0)
    for broken in (ref.logits.roll(1, 0), torch.zeros_like(ref.logits)):  # bags mixed up; a dead head
        assert (broken - ref.logits).abs().max() > atol, f"{name}: atol {atol} would pass a broken model"


def cast_first_mismatches(model: MILAggregator, x: torch.Tensor, ptr: torch.Tensor) -> list[str]:
    """Output fields that differ between float32 features and the same features already in bfloat16, under
    bfloat16 autocast, in eval mode and in training mode with labels (same random draws and the same starting
    state for both: a training forward may update buffers, as AMiL's control statistics)."""
    labels = torch.arange(len(ptr) - 1) % C
    differ = []
    for training in (False, True):
        outs = []
        for features in (x, x.to(torch.bfloat16)):
            torch.manual_seed(3)
            twin = copy.deepcopy(model).train(training)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(twin(features, ptr, labels=labels if training else None))
        a, b = outs
        pairs = {"logits": (a.logits, b.logits), "attention": (a.attention, b.attention),
                 "embedding": (a.embedding, b.embedding)}  # fmt: skip
        pairs.update({f"aux {k}": (v, b.aux_losses[k]) for k, v in a.aux_losses.items()})
        pairs.update({f"scores {k}": (v, b.instance_scores[k]) for k, v in a.instance_scores.items()})
        differ += [f"{key} ({'train' if training else 'eval'})" for key, (u, v) in pairs.items()
                   if u.dtype != v.dtype or not torch.equal(u, v)]  # fmt: skip
    return differ


def check_casts_input_first_where_declared(name: str) -> None:
    """A model declaring ``casts_input_first`` gives bit-identical outputs from features already in the
    autocast dtype (the trainer gathers them so); the others get float32 features and are not checked."""
    model = build(name)
    if not model.casts_input_first:
        return
    x, ptr = make_batch(SIZES)
    assert cast_first_mismatches(fitted(model, x), x, ptr) == []


CHECKS = (
    check_output_shapes_and_attention_sums_to_one,
    check_batch_invariance,
    check_permutation_invariance_where_declared,
    check_ptr_path_equals_padded_path,
    check_every_parameter_gets_a_gradient,
    check_reset_head_keeps_old_rows,
    check_bags_of_one_and_of_5000_instances,
    check_empty_bags_are_defined,
    check_bad_inputs_raise_clear_errors,
    check_state_dict_round_trip,
    check_bf16_autocast_keeps_the_contract,
    check_casts_input_first_where_declared,
)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_contract(check, name: str) -> None:
    check(name)


def test_reset_head_of_multi_branch_abmil() -> None:
    check_reset_head_keeps_old_rows("abmil", multi_branch=True)


def bf16_errors(seeds: int = 10) -> dict[str, float]:
    """Largest ``|bf16 - fp32|`` logit difference of each aggregator over ``seeds`` models and batches."""
    worst = {}
    for name in list_aggregators():
        errors = []
        for seed in range(seeds):
            x, ptr = make_batch(SIZES, seed=100 + seed)
            model = fitted(build(name, seed=seed), x).eval()
            with torch.no_grad():
                ref = model(x, ptr).logits
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    errors.append(float((model(x, ptr).logits.float() - ref).abs().max()))
        worst[name] = max(errors)
    return worst


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, ptr = make_batch(SIZES)
    model = fitted(build(name), x).eval()
    with torch.no_grad():
        ref = model(x, ptr)
        gpu = model.cuda()(x.cuda(), ptr.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gpu.attention.cpu(), ref.attention, atol=1e-5, rtol=1e-3)
    model.train()
    labels = torch.tensor([0, 1, 2, 1], device="cuda")
    out = model(x.cuda(), ptr.cuda(), labels=labels)
    (F.cross_entropy(out.logits.float(), labels) + sum(out.aux_losses.values())).backward()
    assert all(p.grad is not None for p in model.parameters())


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, error in bf16_errors().items():
        print(f"{name:10s} max |bf16 - fp32| logits: {error:.4f}  (tolerance {BF16_ATOL.get(name, BF16_ATOL_DEFAULT)})")


def test_a_false_casts_input_first_declaration_is_caught() -> None:
    """The check fails a model that declares ``casts_input_first`` but computes on float32 features first."""
    from milcore.models import AggregatorConfig
    from milcore.models.layers import autocast_input
    from milcore.ops import segment_mean

    class FloatFirst(MILAggregator):  # not registered: built directly
        casts_input_first = True

        def __init__(self, config: AggregatorConfig) -> None:
            super().__init__(config)
            self.head = torch.nn.Linear(config.in_dim, config.num_classes)

        def pool(self, x, ptr, index, coords, labels) -> MILOutput:
            h = autocast_input(x.float() / 3.0)  # (N, D) float32 work before the cast: not cast-first
            z = segment_mean(h, ptr, index)  # (B, D)
            return MILOutput(self.head(z), torch.ones(len(x)) / segment_sum(torch.ones(len(x)), ptr, index)[index], z)

    torch.manual_seed(0)
    model = FloatFirst(AggregatorConfig(in_dim=D, num_classes=C))
    x, ptr = make_batch(SIZES)
    assert "logits (eval)" in cast_first_mismatches(model, x, ptr)
