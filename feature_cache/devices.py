"""Device names checked up front: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (and ``mps`` where torch has it).

Every command that takes ``--device`` resolves it here *before* creating any output, so a machine
without CUDA gets a one-line :class:`~feature_cache.errors.InvalidArgumentError` naming the option
instead of an internal error half-way through a run.

:func:`native_bf16` says whether a device computes bfloat16 products natively (so bf16 autocast pays): the
one rule behind ``amp: native`` in training and the encoders' precision choice.
"""

from __future__ import annotations

import functools
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


#: CPU features that make bfloat16 matrix products faster than float32 (AVX512-BF16 dot products, AMX
#: tiles). Without them bf16 autocast is emulated: an ABMIL training step was ~10x slower than float32
#: on an AVX2-only CPU, while with AVX512-BF16 it is ~3x faster (``benchmarks/README.md``, bench speed).
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> frozenset[str]:
    """Instruction-set features of this CPU (lower case, as ``/proc/cpuinfo`` spells them).

    Read from torch's own CPU detection where it offers one, else from ``/proc/cpuinfo``; empty when
    neither is available (then no CPU counts as having native bf16).
    """
    import torch

    try:
        caps = torch._C._cpu._get_cpu_capability()  # a dict of feature -> bool in torch >= 2.3
        return frozenset(k.lower() for k, v in caps.items() if v is True)
    except (AttributeError, RuntimeError, TypeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 matrix products natively (so bf16 autocast pays).

    CUDA: ``torch.cuda.is_bf16_supported()``; CPU: one of :data:`NATIVE_BF16_CPU_FLAGS` (decided from the
    CPU's features, never by timing, so the same machine always trains the same way).
    """
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)
    return False
