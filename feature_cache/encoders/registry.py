"""Encoder registry in the style of timm: ``create_encoder``, ``list_encoders`` (wildcards), ``register_encoder``.

Built-in encoders live in their own modules and are imported (with torch) on first use, so
``import feature_cache.encoders`` stays cheap. A factory has the signature
``factory(weights=None, device=None, **options) -> Encoder``; its options are declared once, in
``register_encoder(..., options=...)`` (type and range, see :mod:`.options`), and checked by
:func:`check_encoder_options` before anything is built or written.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feature_cache.encoders.options import EncoderOption, check_options, factory_options
from feature_cache.errors import InvalidArgumentError, UserError

if TYPE_CHECKING:
    from feature_cache.encoders.base import Encoder


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


_REGISTRY: dict[str, EncoderSpec] = {}

# name -> module that registers it on import
BUILTIN_ENCODERS: dict[str, str] = {
    "efficientnet_lite0": "feature_cache.encoders.efficientnet",
    "morphology": "feature_cache.encoders.morphology",
    "toy": "feature_cache.encoders.toy",
    "vit_small_patch14_dinov2": "feature_cache.encoders.vit",
    "vit_base_patch14_dinov2": "feature_cache.encoders.vit",
    "vit_large_patch14_dinov2": "feature_cache.encoders.vit",
}


Factory = Callable[..., "Encoder"]


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
        InvalidArgumentError: ``name`` is already taken by another factory, or an option is
            declared that the factory does not take.
    """

    def wrap(factory: Factory) -> Factory:
        old = _REGISTRY.get(name)
        if old is not None and old.factory.__qualname__ != factory.__qualname__:
            raise InvalidArgumentError(f"encoder {name!r} is already registered by {old.factory.__module__}")
        _REGISTRY[name] = EncoderSpec(name, factory, requires_weights, factory_options(name, factory, options))
        return factory

    return wrap


def list_encoders(pattern: str = "*") -> list[str]:
    """Sorted encoder names (registered or built in) matching a shell-style ``pattern``."""
    return sorted(n for n in set(_REGISTRY) | set(BUILTIN_ENCODERS) if fnmatch.fnmatchcase(n, pattern))


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of ``name``, importing its built-in module when needed.

    Raises:
        InvalidArgumentError: unknown name.
    """
    if name not in _REGISTRY and name in BUILTIN_ENCODERS:
        importlib.import_module(BUILTIN_ENCODERS[name])
    if name not in _REGISTRY:
        near = list_encoders(f"*{name}*") or list_encoders()
        raise InvalidArgumentError(f"unknown encoder {name!r}; known: {', '.join(near)}")
    return _REGISTRY[name]


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
