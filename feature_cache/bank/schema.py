"""The bank's on-disk schema: names, versions, the encoder fingerprint and writer settings.

See ``docs/bank_schema.md`` for the written specification. This module holds no I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.errors import BankError, EncoderMismatchError

FORMAT = "milcore.feature_bank"
FORMAT_VERSION = "1.3"
SUPPORTED_MAJOR = 1
#: From this minor version on every chunk of every Zarr array is stored (a missing one is damage).
EVERY_CHUNK_MINOR = 2

FEATURES = "instances/features"
COORDS = "instances/coords"
CELL_ID = "instances/cell_id"
CELL_TYPE = "instances/cell_type"
BAG_ID = "bags/bag_id"
CHECKSUM = "bags/checksum"
BAG_OFFSET = "indexes/bag_offset"
#: Longest cell id (UTF-8 bytes); ids are file stems ("c00012", "BloodImage_00010_wbc0003") or numbers.
CELL_ID_BYTES = 48
#: Optional per-cell columns: name -> (dtype, width, missing value). ``cell_id`` holds UTF-8 bytes
#: zero-padded to CELL_ID_BYTES (a plain uint8 matrix, so HDF5, Zarr and raw reads treat it like coords).
INSTANCE_COLUMNS: dict[str, tuple[str, int, int]] = {
    "coords": ("int32", 2, -1),
    "cell_id": ("uint8", CELL_ID_BYTES, 0),
    "cell_type": ("int16", 1, -1),
}
RESERVED_BAG_COLUMNS = frozenset({"bag_id", "checksum"})
FEATURE_DTYPES = ("float16", "float32")
COMPRESSIONS = (None, "lzf", "gzip", "blosc-zstd")
HDF5_SUFFIXES = (".h5", ".hdf5")
ZARR_SUFFIXES = (".zarr",)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _hardware_crc() -> bool:
    from feature_cache.bank.checksum import default_algorithm

    return default_algorithm() == "crc32c"


def backend_for(path: str | Path) -> str:
    """``"hdf5"`` for ``.h5``/``.hdf5`` paths, ``"zarr"`` for ``.zarr``; anything else is an error."""
    suffix = Path(path).suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    raise BankError(f"{path}: unknown bank type '{suffix or '(no suffix)'}' (use .h5, .hdf5 or .zarr)")


def version_parts(version: Any) -> tuple[int, int]:
    """``(major, minor)`` of a ``format_version`` string; ``(-1, -1)`` when it is not ``"<int>.<int>"``."""
    try:
        major, minor = str(version).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return -1, -1


def utc_now() -> str:
    """The current time as ISO 8601 UTC, second resolution."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def generated_by() -> str:
    """Value of the ``generated_by`` root attribute."""
    from feature_cache import __version__

    return f"feature_cache {__version__}"


def _canonical_transform(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    raise BankError(f"encoder transform must be a string or a JSON-like mapping, got {type(value).__name__}")


UNRECORDED = "unrecorded"
#: Precisions an encoder may compute in (``torch.autocast`` dtypes and float32).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_dtype(value: str) -> str:
    """``value`` if it names a compute precision (``COMPUTE_DTYPES``, ``unrecorded`` or ``mixed:A+B``).

    Raises:
        BankError: anything else.
    """
    parts = value[len("mixed:"):].split("+") if isinstance(value, str) and value.startswith("mixed:") else None
    ok = value in (*COMPUTE_DTYPES, UNRECORDED) or (
        parts is not None and len(parts) >= 2 and all(p in (*COMPUTE_DTYPES, UNRECORDED) for p in parts)
    )
    if not ok:
        raise BankError(f"encoder compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, {UNRECORDED} or "
                        f"mixed:A+B, got {value!r}")  # fmt: skip
    return value


@dataclass(frozen=True)
class EncoderInfo:
    """Fingerprint of the encoder that produced a bank's features.

    Attributes:
        name: registry name of the encoder, e.g. ``"efficientnet_lite0"``.
        version: encoder code/weights version string.
        weights_sha256: SHA-256 of the weights file (``""`` for weight-free encoders).
        transform: canonical description of the pixel transform (a string; a mapping is
            turned into canonical JSON).
        dim: feature dimension ``D``.
        dtype: dtype the encoder emits (informational; not part of the fingerprint).
        compute_dtype: precision the encoder computed in when the bank was extracted (the autocast
            dtype: ``float32`` on CPU, ``bfloat16``/``float16`` on CUDA); ``unrecorded`` for banks written
            before it was recorded (format < 1.3) or imported from elsewhere; ``mixed:A+B`` for a merge
            that accepted shards of several precisions. Not part of the fingerprint (a model trained on
            one precision still applies to another, with a warning); ``bank merge`` and resuming an
            extraction refuse to mix precisions.
    """

    name: str
    version: str
    weights_sha256: str
    transform: str
    dim: int
    dtype: str = "float32"
    compute_dtype: str = UNRECORDED

    def __post_init__(self) -> None:
        object.__setattr__(self, "transform", _canonical_transform(self.transform))
        if not isinstance(self.name, str) or not self.name:
            raise BankError(f"encoder name must be a non-empty string, got {self.name!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int | np.integer) or int(self.dim) <= 0:
            raise BankError(f"encoder dim must be a positive integer, got {self.dim!r}")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "version", str(self.version))
        sha = str(self.weights_sha256).lower()
        if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise BankError(f"encoder weights_sha256 must be 64 hex digits or empty, got {sha!r}")
        object.__setattr__(self, "weights_sha256", sha)
        object.__setattr__(self, "dtype", str(np.dtype(self.dtype)))
        check_compute_dtype(self.compute_dtype)

    def fingerprint(self) -> str:
        """Stable SHA-256 hex digest of (name, version, weights_sha256, transform, dim)."""
        key = {k: getattr(self, k) for k in ("name", "version", "weights_sha256", "transform", "dim")}
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields plus ``fingerprint`` (JSON-ready)."""
        out = asdict(self)
        out["fingerprint"] = self.fingerprint()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> EncoderInfo:
        """Inverse of :meth:`to_dict`; also accepts the JSON string stored in a bank.

        Raises:
            BankError: a field is missing, or a stored fingerprint does not match the fields.
        """
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise BankError(f"encoder fingerprint is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise BankError("encoder fingerprint must be a mapping")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in ("dtype", "compute_dtype")]
        if missing:
            raise BankError(f"encoder fingerprint lacks {', '.join(missing)}")
        info = cls(**{n: data[n] for n in names if n in data})
        stored = data.get("fingerprint")
        if stored is not None and stored != info.fingerprint():
            raise BankError("encoder fingerprint does not match its fields (edited or from another version)")
        return info

    def precision_note(self, other: EncoderInfo) -> str | None:
        """Why features of ``other`` were computed in another precision than these, or ``None``.

        ``None`` when both record the same precision, or when either is ``unrecorded`` (nothing to
        compare: said by the caller if it matters).
        """
        a, b = self.compute_dtype, other.compute_dtype
        if a == b or UNRECORDED in (a, b):
            return None
        return f"features computed in {b}, not {a} as those the model was trained on"

    def differences(self, other: EncoderInfo) -> list[str]:
        """Names of the fingerprinted fields that differ from ``other``."""
        keys = ("name", "version", "weights_sha256", "transform", "dim")
        return [k for k in keys if getattr(self, k) != getattr(other, k)]

    def check_compatible(self, other: EncoderInfo, *, where: str) -> None:
        """Raise :class:`EncoderMismatchError` (naming ``where``) unless fingerprints are equal."""
        diff = self.differences(other)
        if diff:
            raise EncoderMismatchError(
                f"{where}: encoder mismatch: expected '{self.name}' ({self.fingerprint()[:12]}), "
                f"got '{other.name}' ({other.fingerprint()[:12]}); differs in {', '.join(diff)}"
            )


@dataclass(frozen=True)
class WriterConfig:
    """How a new bank stores its features.

    Attributes:
        dtype: ``"float16"`` (default) or ``"float32"``.
        compression: ``None``, ``"lzf"`` (HDF5 only), ``"gzip"`` or ``"blosc-zstd"``.
        chunk_rows: rows per chunk (compressed HDF5, and Zarr); ``0`` chooses for whole-bag reads.
        checksum: store a checksum of every bag's feature bytes (CRC-32C with the hardware
            ``google-crc32c``, else zlib's CRC-32), checked by ``verify`` and on a bag's first
            whole-bag read. On by default where the hardware CRC-32C is available (it keeps at least
            0.9x of the unchecked write throughput in ``benchmarks/bench_bank_io.py``); off without it
            (zlib's CRC-32 kept 0.58-0.87x there).
        durable: ``fsync`` after every bag and before the final rename (survives power loss,
            not only a killed process); slower.
    """

    dtype: str = "float16"
    compression: str | None = None
    chunk_rows: int = 0
    checksum: bool = field(default_factory=lambda: _hardware_crc())
    durable: bool = False

    def __post_init__(self) -> None:
        try:
            dtype = str(np.dtype(self.dtype))
        except TypeError:
            dtype = ""
        if dtype not in FEATURE_DTYPES:
            raise BankError(f"feature dtype must be float16 or float32, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        comp = None if self.compression in (None, "none", "") else str(self.compression)
        if comp not in COMPRESSIONS:
            raise BankError(f"unknown compression {self.compression!r} (use none, lzf, gzip or blosc-zstd)")
        object.__setattr__(self, "compression", comp)
        if int(self.chunk_rows) < 0:
            raise BankError(f"chunk_rows must be >= 0, got {self.chunk_rows}")

    def resolved_chunk_rows(self, backend: str, dim: int) -> int:
        """Rows per chunk: the configured value, else sized for whole-bag reads.

        Compressed chunks hold 256 rows (a median bag of ~300 cells touches 2-3 chunks, so a
        random bag read decompresses little more than itself). Uncompressed Zarr chunks hold
        about 4 MiB (the reader reads only the rows it needs from a chunk file, so size only sets
        the file count). Uncompressed HDF5 features are contiguous and have no chunks.
        """
        if self.chunk_rows:
            return int(self.chunk_rows)
        if self.compression is not None:
            return 256
        if backend == "hdf5":
            return 0
        row_bytes = dim * np.dtype(self.dtype).itemsize
        return int(min(65536, max(256, 2 ** round(math.log2(max(1, (4 << 20) / row_bytes))))))


def check_bag_id(bag_id: Any, where: str) -> str:
    """Return ``bag_id`` if it is a non-empty string without newlines, else raise."""
    if not isinstance(bag_id, str) or not bag_id or "\n" in bag_id or "\x00" in bag_id:
        raise BankError(f"{where}: bag id must be a non-empty one-line string, got {bag_id!r}")
    return bag_id


#: Per-bag metadata column kinds: numpy dtype and the value used for bags that lack it.
META_KINDS: dict[str, tuple[str, Any]] = {
    "bool": ("bool", False),
    "int": ("int64", -1),
    "float": ("float64", float("nan")),
    "str": ("str", ""),
}


def meta_kind(value: Any) -> str | None:
    """Kind of a metadata value (``bool``, ``int``, ``float``, ``str``), or ``None`` if unsupported."""
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | np.integer):
        return "int"
    if isinstance(value, float | np.floating):
        return "float"
    if isinstance(value, str):
        return "str"
    return None


def check_meta(meta: Mapping[str, Any] | None, kinds: Mapping[str, str], where: str) -> dict[str, Any]:
    """Validate one bag's metadata against the known column kinds; returns JSON-ready values.

    Int and float mix (the column becomes float); any other kind change is an error.
    """
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise BankError(f"{where}: meta must be a mapping of column -> scalar, got {type(meta).__name__}")
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not _NAME.match(key) or key in RESERVED_BAG_COLUMNS:
            raise BankError(f"{where}: invalid meta column name {key!r} (letters, digits, _ . - only)")
        kind = meta_kind(value)
        if kind is None:
            raise BankError(f"{where}: meta '{key}' must be a bool, int, float or str, got {type(value).__name__}")
        known = kinds.get(key)
        numeric = {known, kind} == {"int", "float"}  # an int column becomes float on a float value
        if known is not None and known != kind and not numeric:
            raise BankError(f"{where}: meta '{key}' is a {known} column, got a {kind} value {value!r}")
        kind = "float" if numeric else kind
        out[key] = {"bool": bool, "int": int, "float": float, "str": str}[kind](value)
    return out
