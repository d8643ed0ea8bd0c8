"""Cell encoders: crops -> (n, D) features, each owning its transform, dtype and fingerprint.

``create_encoder(name, weights=None, device=None, **options)`` returns an
:class:`~feature_cache.encoders.base.Encoder` (``module``, ``transform``, ``dtype``, ``info``);
``list_encoders("vit_*")`` lists names. Every module of this package that calls
:func:`register_encoder` is a built-in (adding an encoder is one new file), e.g. ``efficientnet_lite0``
(ImageNet weights from an installed package), ``vit_{small,base,large}_patch14_dinov2`` (DINOv2/DinoBloom
checkpoints on disk), ``morphology`` (hand-made cell features) and ``toy`` (tests); plug-ins come from
the ``milcore.encoders`` entry points or ``$MILCORE_PLUGINS``. torch is imported only when an encoder is
created.
"""

from feature_cache.encoders.options import EncoderOption
from feature_cache.encoders.registry import (
    EncoderSpec,
    check_encoder_options,
    create_encoder,
    encoder_spec,
    list_encoders,
    register_encoder,
)

__all__ = [
    "EncoderOption",
    "EncoderSpec",
    "check_encoder_options",
    "create_encoder",
    "encoder_spec",
    "list_encoders",
    "register_encoder",
]
