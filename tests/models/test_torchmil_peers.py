"""torchmil's CLAM-SB and DTFD-MIL as benchmark peers (``milcore.bench.peers``), beside its ABMIL/DSMIL/TransMIL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feature_cache.errors import UserError
from milcore.bench import PEER_MODELS
from milcore.bench.aggregators import check_models
from milcore.bench.peers import TorchmilAggregator, import_torchmil
from milcore.models import list_aggregators
from milcore.models.output import check_output_contract

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(import_torchmil() is None, reason="torchmil is not installed (the 'peers' extra)"),
]

NEW_PEERS = ("clam_sb", "dtfd")


def test_new_peers_are_named_after_our_aggregators() -> None:
    assert set(NEW_PEERS) <= set(PEER_MODELS) and set(PEER_MODELS) <= set(list_aggregators())
    check_models(("clam_sb", "dtfd"), NEW_PEERS)  # accepted as --models and as --peers
    with pytest.raises(UserError, match=r"unknown peer 'clam' \(torchmil adapters: .*clam_sb, dtfd\)"):
        check_models((), ("clam",))


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("name", NEW_PEERS)
def test_peer_trains_and_predicts_through_the_contract(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    x, ptr = torch.randn(45, 12), torch.tensor([0, 3, 20, 45])  # bags of different sizes: padding
    labels = torch.tensor([0, 1, num_classes - 1])
    model = TorchmilAggregator(name, 12, num_classes).train()
    out = check_output_contract(model(x, ptr, labels=labels), ptr, num_classes, where=name)
    aux = {"clam_sb": "instance", "dtfd": "tier1"}[name]
    assert set(out.aux_losses) == {aux} and torch.isfinite(out.aux_losses[aux])
    (F.cross_entropy(out.logits, labels) + sum(out.aux_losses.values())).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        first = check_output_contract(model(x, ptr), ptr, num_classes, where=name)
        alone = model(x[3:20], torch.tensor([0, 17]))
    assert first.aux_losses == {}
    if name == "clam_sb":  # padding changes nothing (torchmil's DTFD-MIL splits at random at inference too)
        torch.testing.assert_close(alone.logits[0], first.logits[1], atol=1e-4, rtol=1e-4)


def test_dtfd_peer_is_reproducible_from_torch_seed() -> None:
    """torchmil splits pseudo-bags with numpy's global generator; the adapter seeds it from torch's."""
    x, ptr, labels = torch.randn(60, 12), torch.tensor([0, 30, 60]), torch.tensor([0, 1])
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = TorchmilAggregator("dtfd", 12, 2).train()
        outs.append(model(x, ptr, labels=labels).aux_losses["tier1"])
    torch.testing.assert_close(outs[0], outs[1])
