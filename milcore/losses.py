"""Losses for MIL training: class-weighted bag cross-entropy, BEL, and instance-level losses.

* :func:`bag_cross_entropy` -- cross-entropy on ``MILOutput.logits`` with optional class weights
  (:func:`class_weights` gives the "balanced" ones, ``n / (C * n_c)``).
* :class:`BagEmbeddingLoss` -- BEL (Sens, Sadafi, et al. 2023): per-class prototype embeddings updated with
  momentum; every bag embedding is pulled toward its class prototype and pushed away (beyond a margin)
  from the other classes' prototypes, with cosine distance. Works with any aggregator, on
  ``MILOutput.embedding``.
* :func:`instance_cross_entropy` -- every instance takes its bag's label (optionally weighted per
  instance), as in single-instance auxiliary losses (AMiL) or mi-Net training.

Typical training step::

    out = model(batch.x, batch.ptr, labels=y)
    loss = bag_cross_entropy(out.logits, y, weights) + sum(out.aux_losses.values())
    loss = loss + bel_weight * bel(out.embedding, y)       # bel = BagEmbeddingLoss(C, E)

Reference:
    Sens, Sadafi, Del Amor, Naranjo, Navab, Marr. "BEL: A Bag Embedding Loss for Transformer enhances
    Multiple Instance Whole Slide Image Classification." ISBI 2023.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feature_cache.errors import InvalidArgumentError
from milcore.ops import ptr_to_index

__all__ = ["BagEmbeddingLoss", "bag_cross_entropy", "class_weights", "instance_cross_entropy"]


def class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Balanced class weights ``n / (C * n_c)`` (float32, ``(C,)``); classes absent from ``labels`` get 0."""
    counts = torch.bincount(labels.long().flatten().cpu(), minlength=num_classes)[:num_classes].float()
    weights = labels.numel() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def bag_cross_entropy(
    logits: Tensor, labels: Tensor, class_weights: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Cross-entropy of ``(B, C)`` bag logits (computed in float32) with optional ``(C,)`` class weights."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise InvalidArgumentError(f"bag_cross_entropy: logits (B, C) and labels (B,), got {tuple(logits.shape)}, "
                                   f"{tuple(labels.shape)}")  # fmt: skip
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    return F.cross_entropy(logits.float(), labels.long(), weight=weight, label_smoothing=label_smoothing)


def instance_cross_entropy(
    instance_logits: Tensor, ptr: Tensor, labels: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Single-instance loss: the CE of every instance against its bag's label, weighted mean.

    Args:
        instance_logits: ``(N, C)`` per-instance logits (e.g. ``MILOutput.instance_scores["logits"]``).
        ptr: ``(B+1,)`` offsets of the bags.
        labels: ``(B,)`` bag labels.
        weights: optional ``(N,)`` non-negative instance weights (e.g. detached attention x bag size).

    Returns:
        A scalar; 0 (with a graph) when there are no instances.
    """
    if instance_logits.shape[0] == 0:
        return instance_logits.sum() * 0.0
    row_labels = labels.long().index_select(0, ptr_to_index(ptr, instance_logits.shape[0]))  # (N,)
    ce = F.cross_entropy(instance_logits.float(), row_labels, reduction="none")  # (N,)
    if weights is None:
        return ce.mean()
    weights = weights.float()
    return (weights * ce).sum() / weights.sum().clamp_min(1e-12)


class BagEmbeddingLoss(nn.Module):
    """BEL: pull bag embeddings toward their class prototype, push them from the others (cosine, margin).

    ``loss = mean_b [ d(e_b, p_{y_b}) + mean_{c != y_b} max(0, margin - d(e_b, p_c)) ]`` with
    ``d = 1 - cos``. Prototypes ``p_c`` are buffers (no gradient), initialised from the first batch that
    contains class ``c`` and then updated in training mode after each call:
    ``p_c <- normalize(momentum * p_c + (1 - momentum) * mean of the batch's normalised class-c embeddings)``.
    Classes not seen yet are left out of the push term.

    Args:
        num_classes: number of classes ``C``.
        dim: embedding width ``E`` (``MILOutput.embedding.shape[1]``).
        margin: cosine distance below which other classes' prototypes are pushed (0..2).
        momentum: prototype momentum (0..1).
        push_weight: weight of the push term relative to the pull term.
    """

    def __init__(
        self, num_classes: int, dim: int, margin: float = 0.5, momentum: float = 0.9, push_weight: float = 1.0
    ) -> None:
        super().__init__()
        if num_classes < 2 or dim < 1:
            raise InvalidArgumentError(f"BEL needs num_classes >= 2 and dim >= 1, got {num_classes}, {dim}")
        if not 0.0 <= margin <= 2.0:
            raise InvalidArgumentError(f"BEL margin must be in [0, 2], got {margin}")
        if not 0.0 <= momentum < 1.0:
            raise InvalidArgumentError(f"BEL momentum must be in [0, 1), got {momentum}")
        if push_weight < 0:
            raise InvalidArgumentError(f"BEL push_weight must be >= 0, got {push_weight}")
        self.margin, self.momentum, self.push_weight = margin, momentum, push_weight
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        """Current number of classes."""
        return self.prototypes.shape[0]

    def forward(self, embedding: Tensor, labels: Tensor) -> Tensor:
        """``(B, E)`` bag embeddings and ``(B,)`` labels -> scalar loss (0 for an empty batch)."""
        if embedding.dim() != 2 or embedding.shape[1] != self.prototypes.shape[1]:
            raise InvalidArgumentError(
                f"BEL expects (B, {self.prototypes.shape[1]}) embeddings, got {tuple(embedding.shape)}"
            )
        if embedding.shape[0] == 0:
            return embedding.sum() * 0.0
        labels = labels.long()
        e = F.normalize(embedding.float(), dim=1)  # (B, E)
        one_hot = F.one_hot(labels, self.num_classes).float()  # (B, C)
        counts = one_hot.sum(0)  # (C,)
        batch_means = F.normalize((one_hot.T @ e.detach()) / counts.clamp(min=1).unsqueeze(1), dim=1)  # (C, E)
        present = counts > 0
        with torch.no_grad():  # classes seen for the first time start at their batch mean
            new = present & ~self.initialized
            self.prototypes[new] = batch_means[new]
            self.initialized |= new
        cos = e @ F.normalize(self.prototypes, dim=1).T  # (B, C)
        dist = 1.0 - cos
        pull = dist.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B,)
        others = (1.0 - one_hot) * self.initialized.float().unsqueeze(0)  # (B, C)
        push = (F.relu(self.margin - dist) * others).sum(1) / others.sum(1).clamp(min=1)  # (B,)
        loss = (pull + self.push_weight * push).mean()
        if self.training:
            with torch.no_grad():
                m = self.momentum
                updated = F.normalize(m * self.prototypes + (1 - m) * batch_means, dim=1)
                self.prototypes[present] = updated[present]
        return loss

    @torch.no_grad()
    def resize(self, num_classes: int) -> None:
        """Grow (or shrink) to ``num_classes``, keeping the prototypes of the classes that remain."""
        if num_classes < 2:
            raise InvalidArgumentError(f"BEL needs num_classes >= 2, got {num_classes}")
        keep = min(num_classes, self.num_classes)
        protos = self.prototypes.new_zeros(num_classes, self.prototypes.shape[1])
        init = self.initialized.new_zeros(num_classes)
        protos[:keep], init[:keep] = self.prototypes[:keep], self.initialized[:keep]
        self.prototypes, self.initialized = protos, init
