"""Device names checked up front: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (and ``mps`` where torch has it).

Every command that takes ``--device`` resolves it here *before* creating any output, so a machine
without CUDA gets a one-line :class:`~feature_cache.errors.InvalidArgumentError` naming the option
instead of an internal error half-way through a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from feature_cache.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | torch.device | None = "auto", *, option: str = "--device") -> torch.device:
    """The torch device for ``name``, checked to exist on this machine.

    Args:
        name: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``, or a ``torch.device``.
        option: how the value is called in messages (the CLI option or config key).

    Returns:
        The device.

    Raises:
        InvalidArgumentError: an unknown device name, CUDA asked for on a machine without it, or a
            CUDA index beyond the devices present.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(
            f"{option} {name!r}: unknown device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
            raise InvalidArgumentError(f"{option} {name}: CUDA is not available on this machine ({build}); "
                                       "use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidArgumentError(f"{option} {name}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidArgumentError(f"{option} {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise InvalidArgumentError(f"{option} {name!r}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return device
