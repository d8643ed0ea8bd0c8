"""CLAM-SB and CLAM-MB: attention MIL with an instance-level clustering loss on the top-k / bottom-k cells.

Reference:
    Lu, Williamson, Chen, Chen, Barbieri, Mahmood. "Data-efficient and weakly supervised computational
    pathology on whole-slide images." Nature Biomedical Engineering 2021 (CLAM).

Both variants embed the cells (``h_i = ReLU(W x_i)``) and score them with gated attention. **CLAM-SB**
(single branch) pools one attention-weighted embedding and classifies it; **CLAM-MB** (multi-branch) has
one attention branch per class, pools ``z_c = sum_i a_ic h_i`` per class and scores class ``c`` with
its own linear classifier on ``z_c`` (attention ``(N, C)``, one column per class).

**Instance-level clustering** (``aux_losses["instance"]`` when labels are given): every class ``c`` has a
binary instance classifier. In a bag of label ``y`` the ``k`` cells with the highest attention (of
branch ``y`` for MB) are pseudo-labelled *positive* for classifier ``y`` and the ``k`` with the lowest
*negative*; with ``subtyping`` (mutually exclusive classes) the top-``k`` cells of every other class's
branch are also *negative* for that class's classifier, and the loss is averaged over classes, as the
reference does. ``k = min(k_sample, n // 2)`` so the two ends of a small bag never overlap (the reference
requires ``n >= k_sample``); a bag of one cell has no instance loss. The reference's binary instance
classifiers (2-way softmax) are written as one logit per class with binary cross-entropy (the same
function); its default instance loss is a smooth top-1 SVM from the ``topk`` package, its alternative
cross-entropy is used here. Selection runs over the packed batch at once (per-bag ranks,
:mod:`milcore.models.bag_ranks`), without a loop over bags. The reference trains ``0.7 * bag + 0.3 *
instance``; the trainer weighs the bag loss 1, so the same ratio is ``instance_loss_weight = 0.3 / 0.7``.
Width: ``embed_dim`` 256, attention 128 as the engine's other aggregators (the reference: 512 and 256).
``instance_scores["logits"]`` holds the instance classifiers' ``(N, C)`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcore.models.bag_ranks import bag_sizes_of_rows, segment_rank
from milcore.models.base import AggregatorConfig, MILAggregator, check_range
from milcore.models.layers import GatedAttention, autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import segment_softmax, segment_sum, weighted_segment_sum

__all__ = ["CLAM_MB", "CLAM_SB", "CLAMConfig"]


@dataclass(frozen=True)
class CLAMConfig(AggregatorConfig):
    """CLAM hyper-parameters (both variants).

    Attributes:
        embed_dim: instance embedding width (``Linear -> ReLU``).
        attention_dim: hidden width of the gated attention.
        k_sample: cells taken from each end of the attention ranking for the clustering loss.
        subtyping: classes are mutually exclusive subtypes: other classes' top cells are their negatives.
        instance_loss_weight: weight of the clustering loss in ``aux_losses["instance"]``.
        dropout: dropout after the embedding and inside the attention MLP.
    """

    embed_dim: int = 256
    attention_dim: int = 128
    k_sample: int = 8
    subtyping: bool = True
    instance_loss_weight: float = 0.3 / 0.7
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 1, integer=True)
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("k_sample", self.k_sample, 1, integer=True)
        check_range("instance_loss_weight", self.instance_loss_weight, 0.0)
        check_range("dropout", self.dropout, 0.0, 0.99)


class _CLAM(MILAggregator):
    """What both variants share: embedding, gated attention, instance classifiers and the clustering loss."""

    casts_input_first = True  # x is read only through autocast_input(x)
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        attention_dim=SearchDim(32, 256, log=True),
        k_sample=SearchDim(2, 32, log=True),
        instance_loss_weight=SearchDim(0.1, 2.0, log=True),
        subtyping=SearchDim(choices=(True, False)),
    )
    branches_per_class = False

    def __init__(self, config: CLAMConfig) -> None:
        super().__init__(config)
        e = config.embed_dim
        self.embed = instance_embedding(config.in_dim, e, config.dropout)
        branches = config.num_classes if self.branches_per_class else 1
        self.attention = GatedAttention(e, config.attention_dim, branches, gated=True, dropout=config.dropout)
        self.instance_head = nn.Linear(e, config.num_classes)  # one binary clustering logit per class

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        scores = self.attention(h)  # (N, K) K = 1 (SB) or C (MB)
        att = segment_softmax(scores, ptr, index)  # (N, K)
        z = weighted_segment_sum(h, att, ptr, index)  # (B, K, E)
        logits, embedding = self._classify(z)  # (B, C), (B, E)
        inst_logits = self.instance_head(h)  # (N, C)
        aux = {}
        if labels is not None:
            aux["instance"] = self.config.instance_loss_weight * self._clustering_loss(
                inst_logits, scores, ptr, index, labels
            )
        attention = att if self.branches_per_class else att[:, 0]
        return MILOutput(logits, attention, embedding, aux, {"logits": inst_logits})

    def _classify(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _clustering_loss(self, inst_logits: Tensor, scores: Tensor, ptr: Tensor, index: Tensor,
                         labels: Tensor) -> Tensor:  # fmt: skip
        """Mean over bags of the top-k / bottom-k pseudo-label BCE (see the module docstring)."""
        n_cls = self.num_classes
        with torch.no_grad():
            size = bag_sizes_of_rows(ptr, index)  # (N,)
            k = torch.clamp(size // 2, max=self.config.k_sample).unsqueeze(1)  # (N, 1)
            top = segment_rank(scores, ptr, index) < k  # (N, K) the k highest of each branch
            bottom = segment_rank(scores, ptr, index, descending=False) < k  # (N, K)
            if scores.shape[1] == 1:
                top, bottom = top.expand(-1, n_cls), bottom.expand(-1, n_cls)  # SB: one ranking for every class
            own = F.one_hot(labels, n_cls).bool().index_select(0, index)  # (N, C) the row's bag class
            positive = own & top
            negative = (own & bottom) | ((~own & top) if self.config.subtyping else torch.zeros_like(own))
            chosen = (positive | negative).float()  # (N, C)
            count = segment_sum(chosen, ptr, index).index_select(0, index)  # (N, C) per bag and class
            weight = chosen / count.clamp(min=1)  # each (bag, class) term is a mean over its chosen cells
            if self.config.subtyping:
                weight = weight / n_cls  # the reference averages the C classifiers' terms
            has_term = segment_sum(chosen.sum(1), ptr, index) > 0  # (B,)
        bce = F.binary_cross_entropy_with_logits(inst_logits.float(), positive.float(), reduction="none")  # (N, C)
        per_bag = segment_sum((weight * bce).sum(1), ptr, index)  # (B,)
        if not bool(has_term.any()):
            return per_bag.sum() * 0.0  # keeps the graph: no bag has two cells
        return per_bag[has_term].mean()

    def _resize_head(self, num_classes: int) -> None:
        self.instance_head = resize_linear(self.instance_head, num_classes)


@register_aggregator("clam_sb", config=CLAMConfig)
class CLAM_SB(_CLAM):  # noqa: N801 (the paper's name)
    """CLAM single-branch (Lu et al. 2021): one attention, per-class instance clustering on its top/bottom cells."""

    def __init__(self, config: CLAMConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(config.embed_dim, config.num_classes)

    def _classify(self, z: Tensor) -> tuple[Tensor, Tensor]:
        embedding = z[:, 0]  # (B, E)
        return self.head(embedding), embedding

    def _resize_head(self, num_classes: int) -> None:
        super()._resize_head(num_classes)
        self.head = resize_linear(self.head, num_classes)


@register_aggregator("clam_mb", config=CLAMConfig)
class CLAM_MB(_CLAM):  # noqa: N801 (the paper's name)
    """CLAM multi-branch (Lu et al. 2021): one attention branch and one bag classifier per class."""

    branches_per_class = True

    def __init__(self, config: CLAMConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(config.embed_dim, config.num_classes)  # row c: class c's classifier on z_c

    def _classify(self, z: Tensor) -> tuple[Tensor, Tensor]:
        logits = (z * self.head.weight.to(z.dtype)).sum(-1) + self.head.bias  # (B, C)
        return logits, z.mean(dim=1)

    def _resize_head(self, num_classes: int) -> None:
        super()._resize_head(num_classes)
        self.head = resize_linear(self.head, num_classes)
        self.attention.score = resize_linear(self.attention.score, num_classes)
