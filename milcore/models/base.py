"""Base config and module shared by every aggregator: validation, head resizing, trainer hooks.

Contract (see ``DESIGN.md``): an aggregator is a ``@dataclass(frozen=True)`` config (a subclass of
:class:`AggregatorConfig`) plus a :class:`MILAggregator` built from it, whose
``forward(x (N, D), ptr (B+1,), coords=None, labels=None)`` returns a
:class:`~milcore.models.output.MILOutput`.

Input checks made by every ``forward`` (:meth:`MILAggregator.check_inputs`):

* ``x`` must be ``(N, in_dim)`` floating point; another width raises an error naming both dims;
* NaN or infinite features raise an error giving the first bad row and its bag (detected from the
  ``(B, C)`` logits, which they always reach, so good batches pay no extra pass over ``x``);
* ``ptr`` must be 1-D integer offsets with ``ptr[0] == 0``, ``ptr[-1] == N``, non-decreasing.

**Empty bags** (``ptr[b] == ptr[b + 1]``) are allowed and well defined: they own no attention rows,
their pooled embedding is that of an empty sum (zeros; TransMIL: the class token alone) and their logits
are the classifier's response to it, so a batch with empty bags never fails and never produces NaN. The
trainer should still drop empty bags from the loss if it does not want them to count.

**Trainer hooks**: before every epoch the trainer calls ``model.on_epoch_start(EpochContext(...))`` on any
model. A model lists what it needs in ``hook_requirements`` (AMiL: ``{"control_instances"}``); the trainer
fills only those fields, lazily (see :class:`EpochContext`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from feature_cache.errors import InvalidArgumentError
from milcore.models.output import MILOutput

__all__ = ["AggregatorConfig", "EpochContext", "MILAggregator", "check_choice", "check_range"]


def check_range(name: str, value: object, low: float, high: float | None = None, integer: bool = False) -> None:
    """Raise :class:`InvalidArgumentError` unless ``low <= value (<= high)`` (and an int if asked)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgumentError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidArgumentError(f"{name} must be {bound}, got {value!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class AggregatorConfig:
    """Fields every aggregator config has.

    Attributes:
        in_dim: instance feature dimension ``D``.
        num_classes: number of bag classes ``C`` (>= 2; a binary task uses 2).
    """

    in_dim: int
    num_classes: int

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; subclasses extend this and call ``super().validate()``."""
        check_range("in_dim", self.in_dim, 1, integer=True)
        check_range("num_classes", self.num_classes, 2, integer=True)


@dataclass(frozen=True)
class EpochContext:
    """What the trainer hands to :meth:`MILAggregator.on_epoch_start`.

    Attributes:
        epoch: 0-based epoch about to start.
        control_instances: only when ``"control_instances"`` is in the model's ``hook_requirements``:
            a callable returning a ``(M, D)`` float tensor of instance features drawn from *control*
            (healthy, label ``config.normal_class``) training bags, e.g. all their rows or a random sample
            of at most ~20k rows. Called at most once per epoch, only if the model needs it.
    """

    epoch: int
    control_instances: Callable[[], Tensor] | None = None


class MILAggregator(nn.Module):
    """Base class of every aggregator (see the module docstring for the contract).

    Class attributes:
        aggregator_name: set by :func:`~milcore.models.registry.register_aggregator`.
        config_class: the config dataclass, set by the registry.
        hook_requirements: :class:`EpochContext` fields the model needs from the trainer.
        permutation_invariant: whether outputs are invariant to the order of rows within a bag.
        has_padded_path: whether :meth:`forward_padded` is implemented (dense ``(B, N_max, D)`` input).
    """

    aggregator_name: ClassVar[str] = ""
    config_class: ClassVar[type[AggregatorConfig]] = AggregatorConfig
    hook_requirements: ClassVar[frozenset[str]] = frozenset()
    permutation_invariant: ClassVar[bool] = True
    has_padded_path: ClassVar[bool] = False

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise InvalidArgumentError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @property
    def num_classes(self) -> int:
        """Current number of classes ``C`` (changes with :meth:`reset_head`)."""
        return self.config.num_classes

    def forward(
        self, x: Tensor, ptr: Tensor, coords: Tensor | None = None, labels: Tensor | None = None
    ) -> MILOutput:
        """Score a packed batch of bags.

        Args:
            x: ``(N, D)`` instance features of all bags, bag ``b`` being rows ``ptr[b]:ptr[b+1]``.
            ptr: ``(B+1,)`` int64 offsets.
            coords: optional ``(N, 2)`` spatial coordinates (used by models that can, e.g. graph MIL).
            labels: optional ``(B,)`` int64 bag labels; models with label-dependent auxiliary losses add
                them to ``aux_losses`` when given (the trainer passes labels while training).
        """
        raise NotImplementedError

    def forward_padded(
        self, x: Tensor, mask: Tensor, coords: Tensor | None = None, labels: Tensor | None = None
    ) -> MILOutput:
        """Same as :meth:`forward` from a dense ``(B, N_max, D)`` batch and its ``(B, N_max)`` mask.

        Attention in the output is aligned with ``x[mask]`` (the packed rows), as for :meth:`forward`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no padded path")

    def reset_head(self, num_classes: int) -> None:
        """Resize the classifier to ``num_classes``, keeping the rows of the classes that remain."""
        check_range("num_classes", num_classes, 2, integer=True)
        self._resize_head(num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def _resize_head(self, num_classes: int) -> None:
        raise NotImplementedError

    def on_epoch_start(self, context: EpochContext) -> None:
        """Optional trainer hook called before each epoch; a no-op unless a model overrides it."""
        return None

    def check_inputs(self, x: Tensor, ptr: Tensor, coords: Tensor | None, labels: Tensor | None) -> None:
        """Validate a packed batch (see the module docstring); raises :class:`InvalidArgumentError`."""
        name = self.aggregator_name or type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InvalidArgumentError(f"{name}: x must be a (N, D) tensor, got {shape}")
        if x.shape[1] != self.config.in_dim:
            raise InvalidArgumentError(
                f"{name}: feature dim mismatch: the model expects in_dim={self.config.in_dim}, "
                f"got features of dim {x.shape[1]}"
            )
        if not x.is_floating_point():
            raise InvalidArgumentError(f"{name}: x must be floating point, got {x.dtype}")
        if not isinstance(ptr, Tensor) or ptr.dim() != 1 or ptr.numel() < 1 or ptr.is_floating_point():
            raise InvalidArgumentError(f"{name}: ptr must be a 1-D integer tensor of B+1 offsets")
        n = x.shape[0]
        flags = torch.stack(
            [
                ptr[0] != 0,
                ptr[-1] != n,
                (ptr[1:] < ptr[:-1]).any(),
            ]
        ).tolist()  # one device sync for all checks
        if flags[0] or flags[1] or flags[2]:
            raise InvalidArgumentError(
                f"{name}: ptr must start at 0, end at N={n} and be non-decreasing, got {_short(ptr)}"
            )
        if coords is not None and (coords.dim() != 2 or coords.shape[0] != n):
            raise InvalidArgumentError(f"{name}: coords must be (N={n}, k), got {tuple(coords.shape)}")
        if labels is not None:
            self._check_labels(labels, ptr.numel() - 1)

    def check_output(self, out: MILOutput, x: Tensor, ptr: Tensor) -> MILOutput:  # ptr: or the padded mask
        """Return ``out``, or raise a clear error if its logits are not finite because ``x`` is not.

        NaN/inf features always reach the logits (through the embedding, the attention softmax or the
        pooling), so checking the ``(B, C)`` logits -- and scanning ``x`` only when they are not finite --
        costs nothing on good batches. Non-finite logits from finite features (a diverged model) are
        returned as they are, for the trainer to handle.
        """
        if bool(torch.isfinite(out.logits).all()):
            return out
        bad = ~torch.isfinite(x).all(dim=-1)  # (N,) or (B, L)
        if x.dim() == 3:
            bad &= ptr  # padded input: only the real slots count
        if bool(bad.any()):
            name = self.aggregator_name or type(self).__name__
            if x.dim() == 3:
                bag, pos = (int(v) for v in bad.nonzero()[0])
                raise InvalidArgumentError(f"{name}: features contain NaN or inf (first in bag {bag}, slot {pos})")
            row = int(bad.nonzero()[0])
            bag = int(torch.searchsorted(ptr, torch.tensor(row, device=ptr.device), right=True)) - 1
            raise InvalidArgumentError(f"{name}: features contain NaN or inf (first at row {row}, bag {bag})")
        return out

    def _check_labels(self, labels: Tensor, num_bags: int) -> None:
        name = self.aggregator_name or type(self).__name__
        if labels.shape != (num_bags,) or labels.is_floating_point():
            raise InvalidArgumentError(f"{name}: labels must be (B={num_bags},) integers, got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise InvalidArgumentError(f"{name}: labels must be in [0, {self.num_classes}), got {_short(labels)}")

    def check_padded(self, x: Tensor, mask: Tensor, labels: Tensor | None = None) -> Tensor:
        """Validate a dense batch without copying it and return its ``(B+1,)`` ``ptr``."""
        name = self.aggregator_name or type(self).__name__
        if x.dim() != 3 or mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise InvalidArgumentError(f"{name}: x must be (B, N_max, D) with a (B, N_max) bool mask")
        sizes = mask.sum(dim=1)
        ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        self.check_inputs(x[:, :0].reshape(0, x.shape[2]), ptr[:1], None, None)  # dims and dtype
        if labels is not None:
            self._check_labels(labels, x.shape[0])
        return ptr


def _short(t: Tensor, limit: int = 8) -> str:
    values = t.detach().flatten().tolist()
    return str(values[:limit])[:-1] + (", ...]" if len(values) > limit else "]")
