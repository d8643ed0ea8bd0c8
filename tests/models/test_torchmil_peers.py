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


def _smooth_top1_svm(x: torch.Tensor, y: torch.Tensor, thresh: float = 1e3) -> torch.Tensor:
    """Berrada et al.'s smooth top-1 SVM (alpha = tau = 1), row by row: the hard max where the top score
    leads the next by >= log(thresh), log-sum-exp elsewhere; mean over rows."""
    terms = []
    for row, label in zip(x, y.long().view(-1), strict=True):
        margin = row + (torch.arange(len(row)) != label).float() - row[label]  # (C,)
        top = row.topk(2).values
        terms.append(margin.max() if top[0] - top[1] >= torch.log(torch.tensor(thresh)) else margin.logsumexp(0))
    return torch.stack(terms).mean()


def test_clam_peer_instance_loss_is_smooth_top1_svm_per_row_even_when_confident() -> None:
    """torchmil 1.0.2's SmoothTop1SVM, called as its CLAM does (targets ``(n, 1)``), broadcasts the targets
    against every row (a wrong loss) and raises once more than two rows are confident ("size of tensor a
    (2) must match ... b (4)": it stopped our CLAM-SB benchmark). The peer's loss is the reference's."""
    loss_fn = TorchmilAggregator("clam_sb", 12, 3).peers[0].inst_loss_fn
    y = torch.tensor([1, 0, 1, 0, 1])
    for x in (torch.tensor([[0.0, 1.0], [0.5, 0.0], [2.0, 0.0], [0.0, 0.3], [1.0, 1.0]]),  # smooth rows only
              torch.tensor([[0.0, 10.0], [10.0, 0.0], [0.0, 9.0], [8.0, 0.0], [0.0, 1.0]]),  # 4 hard rows
              torch.tensor([[0.0, 10.0], [10.0, 0.0], [0.0, 9.0], [8.0, 0.0], [0.0, 8.0]])):  # hard only  # fmt: skip
        torch.testing.assert_close(loss_fn(x, y.unsqueeze(-1).float()), _smooth_top1_svm(x, y))
    torch.manual_seed(0)  # end to end: a confident instance classifier trains
    model = TorchmilAggregator("clam_sb", 12, 3).train()
    x, ptr, labels = torch.randn(45, 12), torch.tensor([0, 3, 20, 45]), torch.tensor([0, 1, 2])
    model(x, ptr)  # materialises torchmil's lazy layers
    with torch.no_grad():
        for head in model.peers[0].inst_classifiers:
            for p in head.parameters():
                p.mul_(100.0)
    assert torch.isfinite(model(x, ptr, labels=labels).aux_losses["instance"])


def test_clam_peer_instance_loss_reaches_its_attention() -> None:
    """CLAM's clustering loss trains the embedding its attention reads (Lu et al.'s shared ``fc`` layer);
    torchmil's CLAM_SB without a ``feat_ext`` feeds it raw features, so the loss trained only its own
    instance classifiers and the peer was ABMIL plus dead weight. The peer carries the embedding."""
    torch.manual_seed(0)
    model = TorchmilAggregator("clam_sb", 12, 3).train()
    x, ptr, labels = torch.randn(45, 12), torch.tensor([0, 3, 20, 45]), torch.tensor([0, 1, 2])
    model(x, ptr, labels=labels).aux_losses["instance"].backward()
    embedding = model.peers[0].feat_ext
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in embedding.parameters())
