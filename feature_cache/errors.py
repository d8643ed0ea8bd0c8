"""Error types shared by ``feature_cache`` and ``milcore``.

A :class:`UserError` is a problem with what the user gave us (a path, an argument, a file's
content). The command line turns it into a one-line message and exit code 2; anything else is a
bug and exits with code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message is shown as one line, without a traceback."""


class InvalidArgumentError(UserError, ValueError):
    """An argument or configuration value is out of range or unknown."""


class OutputExistsError(UserError, FileExistsError):
    """An output location exists and is not empty, and overwriting was not asked for."""
