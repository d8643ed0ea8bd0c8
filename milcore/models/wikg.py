"""WiKG: a dynamic graph over each bag's cells, with knowledge-aware attention on its edges.

Reference:
    Li, Chen, Chu, Sun, Guan, Han, He. "Dynamic Graph Representation with Knowledge-aware Attention for
    Histopathology Whole Slide Image Analysis." CVPR 2024.

Per bag: ``h_i = LeakyReLU(W x_i)``, averaged with the bag mean (``(h_i + mean h) / 2``); every cell
gets a **head** and a **tail** embedding (``e_h = W_h h``, ``e_t = W_t h``). The graph is built in the
embedding space and rebuilt at every forward pass as it learns (hence *dynamic*): cell ``i``'s
neighbours are the ``topk`` cells ``j`` of its own bag with the largest ``<e_h_i, e_t_j> / sqrt(E)``
(itself included, as in the reference; a directed graph: head-to-tail affinity is not symmetric).
**Knowledge-aware attention** then weighs each edge: with ``p_ij`` the softmax of the affinities over
the neighbours, the edge's "relation" is ``r_ij = p_ij e_t_j + (1 - p_ij) e_h_i``, its gate
``tanh(e_h_i + r_ij)`` and its weight ``softmax_j <e_t_j, gate_ij>``; the neighbourhood message is
``m_i = sum_j w_ij e_t_j``. Bi-interaction aggregation (the reference's default):
``LeakyReLU(W1 (e_h + m)) + LeakyReLU(W2 (e_h * m))`` (also ``gcn``: ``LeakyReLU(W (e_h + m))`` and
``sage``: ``LeakyReLU(W [e_h, m])``). An attention readout (``Linear -> LeakyReLU -> Linear``, softmax
``r_i`` within the bag), LayerNorm and a linear classifier give the logits.

**Reported attention**: the readout weight ``r_i`` says which *nodes* the bag embedding is made of, but
a node already mixes its neighbours, and the edges concentrate on the informative cells (on the 5%
witness learning check, 48% of all edges of disease bags pointed at the 5% witnesses, and the readout
weight alone ranked the witnesses at chance: instance-AUROC 0.53). The attention returned is therefore
the one-layer **attention rollout** (Abnar & Zuidema 2020, a residual counted as half):
``0.5 r_j + 0.5 sum_i r_i w_ij``, the readout weight of the cell itself plus what reaches it along the
edges; it sums to 1 per bag (0.96 on the same check; the edge part alone 0.99). The readout weights are
in ``instance_scores["readout_attention"]``.

The neighbour search is an exact top-k over each bag's affinity matrix, made without gradient in blocks
of query rows (dense ``(B, L, L)`` for small batches), so memory stays linear in the bag size; the
selected edges' affinities are then recomputed with gradient, so the edge weights learn as in the
reference. Edges never cross bags. Width: ``embed_dim`` 256 as the engine's other aggregators (the
reference: 512); its message dropout (0.3) is the ``dropout`` option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcore.models.base import AggregatorConfig, MILAggregator, check_choice, check_range
from milcore.models.layers import autocast_input, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import (
    pairwise_padding_pays,
    ptr_to_sizes,
    segment_mean,
    segment_softmax,
    to_padded,
    weighted_segment_sum,
)

__all__ = ["WiKG", "WiKGConfig"]

_DENSE_BUDGET = 1 << 22  # elements of a (B, L, L) affinity tensor searched in one go


@dataclass(frozen=True)
class WiKGConfig(AggregatorConfig):
    """WiKG hyper-parameters.

    Attributes:
        embed_dim: width of the cell embedding and of the head/tail embeddings.
        topk: neighbours of each cell (itself included; a bag of fewer cells uses all of them).
        aggregation: ``"bi-interaction"``, ``"gcn"`` or ``"sage"``.
        dropout: dropout on the aggregated node embeddings (the reference's message dropout, 0.3).
    """

    embed_dim: int = 256
    topk: int = 6
    aggregation: str = "bi-interaction"
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 2, integer=True)
        check_range("topk", self.topk, 1, integer=True)
        check_choice("aggregation", self.aggregation, ("bi-interaction", "gcn", "sage"))
        check_range("dropout", self.dropout, 0.0, 0.99)


@register_aggregator("wikg", config=WiKGConfig)
class WiKG(MILAggregator):
    """WiKG (Li et al. 2024): top-k head/tail graph in embedding space, knowledge-aware edge attention."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        topk=SearchDim(2, 16),
        aggregation=SearchDim(choices=("bi-interaction", "gcn", "sage")),
    )

    def __init__(self, config: WiKGConfig) -> None:
        super().__init__(config)
        e = config.embed_dim
        self.embed = nn.Sequential(nn.Linear(config.in_dim, e), nn.LeakyReLU())
        self.w_head = nn.Linear(e, e)
        self.w_tail = nn.Linear(e, e)
        if config.aggregation == "bi-interaction":
            self.linear1, self.linear2 = nn.Linear(e, e), nn.Linear(e, e)
        else:
            self.linear1 = nn.Linear(e * (2 if config.aggregation == "sage" else 1), e)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.readout = nn.Sequential(nn.Linear(e, e // 2), nn.LeakyReLU(), nn.Linear(e // 2, 1))
        self.norm = nn.LayerNorm(e)
        self.head = nn.Linear(e, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        h = 0.5 * (h + segment_mean(h, ptr, index).index_select(0, index))
        e_h, e_t = self.w_head(h), self.w_tail(h)  # (N, E)
        scale = e_h.shape[1] ** -0.5
        rows, valid = top_affinities(e_h, e_t, ptr, self.config.topk)  # (N, k), (N, k)
        nb = e_t.index_select(0, rows.flatten()).view(rows.shape[0], rows.shape[1], e_t.shape[1])  # (N, k, E) tails
        # products and sums over the embedding rather than N batched (k, E) @ (E, 1) products: tiny matrices make
        # a slow batched matrix product on CPU (with the per-bag neighbour search below, WiKG's CPU s per epoch
        # in the full benchmark went 0.80 -> 0.71, same machine state; benchmarks/README.md, issue 18 speed)
        affinity = (nb * e_h.unsqueeze(1)).sum(-1).float() * scale  # (N, k), with gradient
        p = affinity.masked_fill(~valid, float("-inf")).softmax(dim=1).unsqueeze(-1).to(nb.dtype)  # (N, k, 1)
        # gate = tanh(e_h + r) with the relation r = p e_t + (1 - p) e_h, in the tails' dtype (bf16 under autocast)
        gate = torch.tanh(torch.addcmul((2 - p) * e_h.unsqueeze(1), p, nb))  # (N, k, E)
        weight = (nb * gate).sum(-1).float().masked_fill(~valid, float("-inf")).softmax(dim=1)  # (N, k)
        message = (weight.unsqueeze(-1).to(nb.dtype) * nb).sum(1)  # (N, E)
        node = self._aggregate(e_h, message)  # (N, E)
        node = self.dropout(node)
        att = segment_softmax(self.readout(node), ptr, index)  # (N, 1) readout attention
        embedding = self.norm(weighted_segment_sum(node, att, ptr, index)[:, 0])  # (B, E)
        through_edges = (att * weight).flatten()  # (N * k,) readout attention of i passed to its neighbours j
        received = torch.zeros_like(att[:, 0]).index_add(0, rows.flatten(), through_edges)  # (N,)
        rollout = 0.5 * att[:, 0] + 0.5 * received  # (N,) sums to 1 per bag
        return MILOutput(self.head(embedding), rollout, embedding, {}, {"readout_attention": att[:, 0]})

    def _aggregate(self, e_h: Tensor, message: Tensor) -> Tensor:
        if self.config.aggregation == "bi-interaction":
            return F.leaky_relu(self.linear1(e_h + message)) + F.leaky_relu(self.linear2(e_h * message))
        if self.config.aggregation == "gcn":
            return F.leaky_relu(self.linear1(e_h + message))
        return F.leaky_relu(self.linear1(torch.cat([e_h, message], dim=1)))

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)


@torch.no_grad()
def top_affinities(query: Tensor, key: Tensor, ptr: Tensor, k: int, block_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``k`` rows of its own bag with the largest ``<query_i, key_j>`` for every row ``i``.

    Returns:
        ``rows (N, k')`` global row indices and ``valid (N, k')`` (``k' = min(k, largest bag)``); a row of a
        bag smaller than ``k'`` has ``valid`` False on its extra slots (which point at the row itself).
    """
    sizes = ptr_to_sizes(ptr)
    n = query.shape[0]
    largest = int(sizes.max()) if sizes.numel() else 0
    kk = max(1, min(k, largest))
    if n == 0:
        return torch.zeros(0, kk, dtype=torch.long, device=query.device), torch.zeros(0, kk, dtype=torch.bool)
    q, t = query.float(), key.float()
    if pairwise_padding_pays(sizes, _DENSE_BUDGET):  # all bags in one padded product, else bag by bag
        dq, mask = to_padded(q, ptr, max_size=largest)  # (B, L, E)
        dt, _ = to_padded(t, ptr, max_size=largest)
        scores = (dq @ dt.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), float("-inf"))  # (B, L, L)
        val, pos = scores.topk(kk, dim=2)  # (B, L, kk)
        rows = (pos + ptr[:-1].view(-1, 1, 1))[mask]  # (N, kk)
        valid = torch.isfinite(val)[mask]
    else:
        offsets = ptr.tolist()
        rows = torch.empty(n, kk, dtype=torch.long, device=q.device)
        valid = torch.zeros(n, kk, dtype=torch.bool, device=q.device)
        for b in range(len(offsets) - 1):
            start, end = offsets[b], offsets[b + 1]
            kb = min(kk, end - start)
            for r0 in range(start, end, block_rows):
                r1 = min(end, r0 + block_rows)
                top = (q[r0:r1] @ t[start:end].T).topk(kb, dim=1).indices + start  # (R, kb)
                rows[r0:r1, :kb], valid[r0:r1, :kb] = top, True
    self_row = torch.arange(n, device=q.device).unsqueeze(1).expand_as(rows)
    return torch.where(valid, rows, self_row), valid
