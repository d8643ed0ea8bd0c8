"""Encoder registry in the style of timm: ``create_encoder``, ``list_encoders`` (wildcards), ``register_encoder``.

One :class:`~feature_cache.registry.Registry` (see there for discovery and plug-ins): every module of
``feature_cache.encoders`` that calls ``register_encoder("name", ...)`` is a built-in, found without
importing it and imported (with torch) on first use, so adding an encoder is one new file and
``import feature_cache.encoders`` / ``list_encoders()`` stay cheap. Plug-ins come from the entry-point
group ``milcore.encoders`` or ``$MILCORE_PLUGINS``.

A factory has the signature ``factory(weights=None, device=None, **options) -> Encoder``; its options
are declared once, in ``register_encoder(..., options=...)`` (type and range, see :mod:`.options`),
kept as the entry's metadata and checked by :func:`check_encoder_options` before anything is built
or written.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feature_cache.encoders.options import RESERVED, EncoderOption, check_options, factory_options
from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.registry import Registry

if TYPE_CHECKING:
    from feature_cache.encoders.base import Encoder

__all__ = [
    "REGISTRY",
    "EncoderSpec",
    "check_encoder_options",
    "create_encoder",
    "encoder_spec",
    "list_encoders",
    "register_encoder",
]


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder.

    Attributes:
        name: registry name.
        factory: builds the encoder.
        requires_weights: True when there is no usable default (a weights file must be given).
        options: the factory's options (besides ``weights`` and ``device``), by name.
    """

    name: str
    factory: Callable[..., Encoder]
    requires_weights: bool
    options: Mapping[str, EncoderOption]


Factory = Callable[..., "Encoder"]


def _check(name: str, factory: Any, metadata: Mapping[str, Any]) -> None:
    """Refuse a factory that is not callable with ``weights=`` and ``device=`` keywords."""
    if not callable(factory):
        raise InvalidArgumentError(f"encoder {name!r}: {factory!r} is not a callable factory")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [r for r in RESERVED if r not in params and not takes_any]
    if missing:
        raise InvalidArgumentError(
            f"encoder {name!r}: factory {getattr(factory, '__qualname__', factory)} must take "
            f"{' and '.join(f'{m}=' for m in missing)} (factory(weights=None, device=None, **options) -> Encoder)"
        )


REGISTRY: Registry[Factory] = Registry(
    "encoder", package="feature_cache.encoders", call="register_encoder", plugin_group="milcore.encoders", check=_check
)


def register_encoder(
    name: str, requires_weights: bool = False, options: Sequence[EncoderOption] = ()
) -> Callable[[Factory], Factory]:
    """Decorator registering an encoder factory under ``name``.

    Args:
        name: registry name.
        requires_weights: a weights file must be given.
        options: type and range of the factory's keyword options; undeclared ones are typed from
            their defaults.

    Raises:
        InvalidArgumentError: ``name`` is already taken by another factory, the factory does not
            take ``weights``/``device``, or an option is declared that the factory does not take.
    """

    def wrap(factory: Factory) -> Factory:
        _check(name, factory, {})
        declared = factory_options(name, factory, options)
        return REGISTRY.add(name, factory, requires_weights=bool(requires_weights), options=declared)

    return wrap


def list_encoders(pattern: str = "*") -> list[str]:
    """Sorted encoder names (built in, registered or plug-ins) matching a shell-style ``pattern``; imports none."""
    return REGISTRY.names(pattern)


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of ``name``, importing its module when needed.

    Raises:
        InvalidArgumentError: unknown name (close matches listed).
    """
    entry = REGISTRY.entry(name)
    return EncoderSpec(name, entry.obj, entry.metadata["requires_weights"], entry.metadata["options"])


def check_encoder_options(name: str, options: Mapping[str, Any], label: str = "encoder option") -> dict[str, Any]:
    """``options`` converted and checked against what encoder ``name`` declares; nothing is built.

    Args:
        name: one of :func:`list_encoders`.
        options: option name -> value or text (``"96"`` from ``--encoder-arg image_size=96``).
        label: how options are called in messages (the CLI passes ``--encoder-arg``).

    Returns:
        The converted values.

    Raises:
        InvalidArgumentError: unknown encoder or option (the known ones listed), or a value of the
            wrong type or out of range, e.g. ``--encoder-arg image_size=100000: must be between 32
            and 1024``.
    """
    return check_options(name, encoder_spec(name).options, options, label)


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    device: str | Any | None = None,
    **options: Any,
) -> Encoder:
    """Build a ready-to-run encoder.

    Args:
        name: one of :func:`list_encoders`.
        weights: local weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``); required for
            the ViTs, optional for ``efficientnet_lite0`` (defaults to its installed package),
            refused by ``morphology`` and ``toy``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``None``/``"auto"`` (CUDA when present).
        **options: encoder-specific options, e.g. ``weights_sha256`` or ``image_size``, checked
            against the encoder's declared options first.

    Returns:
        The encoder: ``module``, ``transform``, ``dtype`` and ``info`` (the bank fingerprint).

    Raises:
        InvalidArgumentError: unknown name or option.
        UserError: a weights problem (missing file, wrong hash, wrong architecture).
    """
    spec = encoder_spec(name)
    options = check_encoder_options(name, options)
    if spec.requires_weights and weights is None:
        raise UserError(f"encoder {name!r} needs a local weights file (weights=PATH / --weights FILE)")
    try:
        inspect.signature(spec.factory).bind(weights=weights, device=device, **options)
    except TypeError as exc:
        raise InvalidArgumentError(f"encoder {name!r}: {exc}") from exc
    return spec.factory(weights=weights, device=device, **options)
