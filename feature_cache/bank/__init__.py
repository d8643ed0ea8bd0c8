"""The feature bank: an on-disk CSR store of per-cell features, one per (cohort, encoder).

A bag (patient, image or slide) is rows ``offsets[b]:offsets[b+1]`` of ``instances/features``.
Two backends share one API, chosen by suffix: HDF5 (``.h5``/``.hdf5``) and Zarr v3 (``.zarr``).
The schema is written down in ``docs/bank_schema.md``.

Example:
    >>> from feature_cache.bank import EncoderInfo, open_reader, open_writer
    >>> info = EncoderInfo("toy", "1", "", "identity", dim=4)
    >>> with open_writer("cohort.h5", info, mode="w") as w:  # doctest: +SKIP
    ...     w.append("patient_1", features, coords=coords, meta={"site": "A"})
    >>> bank = open_reader("cohort.h5")  # doctest: +SKIP
    >>> x, ptr = bank.read_packed(["patient_1"])  # doctest: +SKIP

Nothing heavy is imported here: h5py and zarr load when a bank of that type is opened.
"""

from __future__ import annotations

from feature_cache.bank.errors import (
    BankError,
    BankFormatError,
    BankLockedError,
    EncoderMismatchError,
    UnknownBagError,
)
from feature_cache.bank.reader import BankReader, open_reader
from feature_cache.bank.schema import FORMAT, FORMAT_VERSION, EncoderInfo, WriterConfig
from feature_cache.bank.writer import BankWriter, open_writer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BankError",
    "BankFormatError",
    "BankLockedError",
    "BankReader",
    "BankWriter",
    "EncoderInfo",
    "EncoderMismatchError",
    "UnknownBagError",
    "WriterConfig",
    "open_reader",
    "open_writer",
]
