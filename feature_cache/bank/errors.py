"""Errors raised by the feature bank; all are :class:`~feature_cache.errors.UserError` subclasses.

Every message is one line that names the file and the problem, so the command line can show it
as is (exit code 2).
"""

from __future__ import annotations

from feature_cache.errors import UserError


class BankError(UserError):
    """A feature bank cannot be opened, read or written as asked."""


class BankFormatError(BankError):
    """The file is missing, is not a feature bank, or its layout is broken or of another version."""


class BankLockedError(BankError):
    """Another writer holds the bank's lock file."""


class UnknownBagError(BankError, LookupError):
    """A bag id that the bank does not contain."""


class EncoderMismatchError(BankError):
    """Two encoder fingerprints differ where they must be equal (append, merge, model vs bank)."""


def first_line(exc: BaseException) -> str:
    """``"<type>: <first line of the message>"`` of a library's exception, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
