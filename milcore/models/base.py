"""Base config and module shared by every aggregator: validation, bookkeeping, head resizing, trainer hooks.

Contract (see ``DESIGN.md``): an aggregator is a ``@dataclass(frozen=True)`` config (a subclass of
:class:`AggregatorConfig`) plus a :class:`MILAggregator` built from it, whose
``forward(x (N, D), ptr (B+1,), coords=None, labels=None)`` returns a
:class:`~milcore.models.output.MILOutput`.

**The base class does the bookkeeping once; an aggregator writes only its pooling.**
:meth:`MILAggregator.forward` is final: it checks the inputs, derives the ``(N,)`` bag index of every
row from ``ptr``, calls the aggregator's :meth:`~MILAggregator.pool` and checks its output. A dense
path is the same: :meth:`~MILAggregator.forward_padded` (final) checks a ``(B, N_max, D)`` batch and
its mask, calls :meth:`~MILAggregator.pool_padded` when the aggregator implements it, and checks the
output. A subclass that overrides ``forward`` or ``forward_padded`` is refused when it is defined.

Input checks (:meth:`MILAggregator.check_inputs`):

* ``x`` must be ``(N, in_dim)`` floating point; another width raises an error naming both dims;
* NaN or infinite features raise an error giving the first bad row and its bag (detected from the
  ``(B, C)`` logits, which they always reach, so good batches pay no extra pass over ``x``);
* ``ptr`` must be 1-D integer offsets with ``ptr[0] == 0``, ``ptr[-1] == N``, non-decreasing.

**Empty bags** (``ptr[b] == ptr[b + 1]``) are allowed and well defined: they own no attention rows,
their pooled embedding is that of an empty sum (zeros; TransMIL: the class token alone) and their logits
are the classifier's response to it, so a batch with empty bags never fails and never produces NaN. The
trainer should still drop empty bags from the loss if it does not want them to count.

**What an aggregator needs** is declared by class attributes, which the registry copies into the
entry's metadata (:func:`~milcore.models.registry.aggregator_needs`), so callers never decide by name:
``uses_coords`` (pass ``(N, 2)`` cell coordinates when the bank has them: graph MIL),
``control_class_field`` (the config field holding the label of control bags: AMiL's ``normal_class``),
``hook_requirements`` (:class:`EpochContext` fields the trainer must fill, lazily: AMiL's
``{"control_instances"}``), ``permutation_invariant``, ``casts_input_first`` (the features are read only
through one cast to the compute dtype, ``autocast_input(x)``, so the trainer may hand them over in that
dtype); ``has_padded_path`` is derived (whether ``pool_padded`` is implemented). Before every epoch the trainer calls
``model.on_epoch_start(EpochContext(...))`` on any model.
"""

from __future__ import annotations

import dataclasses
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from feature_cache.config import Config, check_choice, check_range
from feature_cache.errors import InvalidArgumentError
from milcore.models.output import MILOutput
from milcore.models.search import SearchDim
from milcore.ops import ptr_to_index

__all__ = ["AggregatorConfig", "EpochContext", "MILAggregator", "check_choice", "check_range"]


@dataclass(frozen=True)
class AggregatorConfig(Config):
    """Fields every aggregator config has (a :class:`~feature_cache.config.Config`: typed fields checked,
    ``from_dict``/``to_dict``; subclasses add range rules in :meth:`validate`).

    Attributes:
        in_dim: instance feature dimension ``D``.
        num_classes: number of bag classes ``C`` (>= 2; a binary task uses 2).
    """

    config_key = "config field"

    in_dim: int
    num_classes: int

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


class MILAggregator(nn.Module, metaclass=ABCMeta):
    """Base class of every aggregator (see the module docstring for the contract).

    A subclass implements :meth:`pool` (and optionally :meth:`pool_padded`) and ``_resize_head``; it
    never overrides :meth:`forward` or :meth:`forward_padded`.

    Class attributes:
        aggregator_name: set by :func:`~milcore.models.registry.register_aggregator`.
        config_class: the config dataclass, set by the registry.
        uses_coords: pass the cells' ``(N, 2)`` coordinates to ``forward`` when the data has them.
        control_class_field: name of the config field holding the label of control (healthy) bags,
            for models that learn from control cells (AMiL: ``"normal_class"``); ``None`` otherwise.
        hook_requirements: :class:`EpochContext` fields the model needs from the trainer.
        permutation_invariant: whether outputs are invariant to the order of rows within a bag.
        casts_input_first: ``x`` is read only through :func:`~milcore.models.layers.autocast_input` at the
            start of :meth:`pool` (and :meth:`pool_padded`), so features already in the autocast dtype give
            the same outputs; the trainer then gathers them in that dtype (half the copying, no cast). A
            contract test checks every aggregator that declares it.
        has_padded_path: whether :meth:`pool_padded` is implemented (derived, not declared).
        search_space: the model's own hyper-parameters a tuner may vary, config field -> ``SearchDim``
            (:mod:`milcore.models.search`; shared training settings are not declared here).
    """

    aggregator_name: ClassVar[str] = ""
    config_class: ClassVar[type[AggregatorConfig]] = AggregatorConfig
    uses_coords: ClassVar[bool] = False
    control_class_field: ClassVar[str | None] = None
    hook_requirements: ClassVar[frozenset[str]] = frozenset()
    permutation_invariant: ClassVar[bool] = True
    casts_input_first: ClassVar[bool] = False
    has_padded_path: ClassVar[bool] = False
    search_space: ClassVar[Mapping[str, SearchDim]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for final in ("forward", "forward_padded"):
            if final in cls.__dict__:
                raise InvalidArgumentError(
                    f"aggregator class {cls.__module__}.{cls.__qualname__} overrides MILAggregator.{final}, which "
                    f"does the checks and bookkeeping: implement pool(x, ptr, index, coords, labels) instead"
                    + (" (and pool_padded for a dense path)" if final == "forward_padded" else "")
                )
        cls.has_padded_path = cls.pool_padded is not MILAggregator.pool_padded

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
        """Score a packed batch of bags (final: checks, bookkeeping, then :meth:`pool`).

        Args:
            x: ``(N, D)`` instance features of all bags, bag ``b`` being rows ``ptr[b]:ptr[b+1]``.
            ptr: ``(B+1,)`` int64 offsets.
            coords: optional ``(N, 2)`` spatial coordinates (used by models that can, e.g. graph MIL).
            labels: optional ``(B,)`` int64 bag labels; models with label-dependent auxiliary losses add
                them to ``aux_losses`` when given (the trainer passes labels while training).

        Raises:
            InvalidArgumentError: malformed inputs, or non-finite features (row and bag named).
        """
        self.check_inputs(x, ptr, coords, labels)
        index = ptr_to_index(ptr, x.shape[0])  # (N,)
        return self.check_output(self.pool(x, ptr, index, coords, labels), x, ptr)

    def forward_padded(
        self, x: Tensor, mask: Tensor, coords: Tensor | None = None, labels: Tensor | None = None
    ) -> MILOutput:
        """Same as :meth:`forward` from a dense ``(B, N_max, D)`` batch and its ``(B, N_max)`` mask.

        Attention in the output is aligned with ``x[mask]`` (the packed rows), as for :meth:`forward`.
        Final: checks, then :meth:`pool_padded`.

        Raises:
            NotImplementedError: the aggregator has no dense path (``has_padded_path`` is False).
        """
        if not self.has_padded_path:
            raise NotImplementedError(f"{type(self).__name__} has no padded path")
        ptr = self.check_padded(x, mask, labels)
        return self.check_output(self.pool_padded(x, mask, ptr, coords, labels), x, mask)

    @abstractmethod
    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        """The aggregator itself: pool checked inputs into a :class:`~milcore.models.output.MILOutput`.

        Args:
            x: ``(N, D)`` finite-or-not features (checked shape and dtype; NaN is reported from the output).
            ptr: ``(B+1,)`` checked offsets.
            index: ``(N,)`` bag of every row (``ptr_to_index(ptr, N)``).
            coords: ``(N, k)`` coordinates or ``None``.
            labels: ``(B,)`` checked labels or ``None``.
        """

    def pool_padded(
        self, x: Tensor, mask: Tensor, ptr: Tensor, coords: Tensor | None, labels: Tensor | None
    ) -> MILOutput:
        """Optional dense path: ``(B, N_max, D)`` features, ``(B, N_max)`` mask, the ``(B+1,)`` ptr of the
        mask; attention aligned with ``x[mask]``. Implementing it sets ``has_padded_path``."""
        raise NotImplementedError(f"{type(self).__name__} has no padded path")

    def reset_head(self, num_classes: int) -> None:
        """Resize the classifier to ``num_classes``, keeping the rows of the classes that remain."""
        check_range("num_classes", num_classes, 2, integer=True)
        self._resize_head(num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def _resize_head(self, num_classes: int) -> None:
        raise NotImplementedError

    def upgrade_state(self, state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Tensors saved by an earlier version of this model, renamed or converted to the current ones.

        Called on a checkpoint's tensors before they are checked against the model (and by
        ``load_state_dict``); the default changes nothing. ``prefix``: where the model's keys start.
        """
        return state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        returned as they are, for the trainer to handle. The shapes are checked too (no device sync):
        a ``MILOutput`` with ``(B, C)`` logits, ``(B, E)`` embedding and, on the packed path, ``N`` rows of
        attention, so a pooling that breaks the contract is named here rather than deep in training.
        """
        self._check_output_shapes(out, x, ptr)
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

    def _check_output_shapes(self, out: MILOutput, x: Tensor, ptr: Tensor) -> None:
        name = self.aggregator_name or type(self).__name__
        if not isinstance(out, MILOutput):
            raise InvalidArgumentError(f"{name}: pool must return a MILOutput, got {type(out).__name__}")
        bags = x.shape[0] if x.dim() == 3 else ptr.shape[0] - 1
        problems = []
        if tuple(out.logits.shape) != (bags, self.num_classes):
            problems.append(f"logits {tuple(out.logits.shape)} (expected ({bags}, {self.num_classes}))")
        if out.embedding.dim() != 2 or out.embedding.shape[0] != bags:
            problems.append(f"embedding {tuple(out.embedding.shape)} (expected ({bags}, E))")
        if x.dim() == 2 and (out.attention.dim() not in (1, 2) or out.attention.shape[0] != x.shape[0]):
            problems.append(f"attention {tuple(out.attention.shape)} (expected ({x.shape[0]},) or ({x.shape[0]}, H))")
        if problems:
            raise InvalidArgumentError(f"{name}: output breaks the MILOutput contract: {'; '.join(problems)}")

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
