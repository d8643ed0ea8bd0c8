"""The ``milcore`` command line: one module per subcommand, heavy imports inside ``run()``.

Exit codes: 0 success, 1 internal error (a bug: please report it), 2 user error (bad argument,
missing or malformed file). User errors print one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from milcore import __version__

#: Subcommands in the order ``milcore --help`` lists them; each is a module ``milcore.cli.<name>``
#: with ``add_parser(subparsers, parents)`` and ``run(args) -> int``.
COMMANDS: tuple[str, ...] = (
    "synth",
    "extract",
    "encoder",
    "bank",
    "train",
    "report",
    "predict",
    "explain",
    "audit",
    "passport",
    "continual",
    "bench",
    "run",
    "models",
)

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2

log = logging.getLogger("milcore")


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (plus a hint), exit code 2.

    Abbreviated long options are refused (``--epoch`` is not ``--epochs``): a prefix that happens to
    match today silently changes meaning when an option is added tomorrow.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``<prog>: error: <message>`` and exit with code 2."""
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER)


def _common_options() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv: debug)"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only, no progress bars"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """Build the full ``milcore`` parser (cheap: no torch import)."""
    common = _common_options()
    parser = OneLineErrorParser(
        prog="milcore",
        description="Multiple-instance-learning diagnosis engine for patient-level blood smears.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"milcore {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in COMMANDS:
        module = importlib.import_module(f"milcore.cli.{name}")
        module.add_parser(subparsers, [common])
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    if verbose == 1 and not quiet:
        level = logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_milcore", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    )
    handler._milcore = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used in-process by tests).

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 on success, 1 on an internal error, 2 on a user error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a bad argument (2)
        return int(exc.code or 0)
    verbose = getattr(args, "verbose", 0) or 0
    quiet = bool(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False))
    _configure_logging(verbose, quiet)
    from feature_cache.progress import set_quiet

    set_quiet(quiet)
    if args.command is None:
        parser.print_help()
        return EXIT_USER
    prog = f"milcore {args.command}"
    from feature_cache.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            log.exception("%s failed", prog)
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USER
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            log.exception("%s failed", prog)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        sys.stderr.write(f"{prog}: error: {where}{exc.strerror or exc}\n")
        return EXIT_USER
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (``milcore models | head``): not an error of ours
        with contextlib.suppress(OSError, ValueError):  # as the Python docs advise: stdout -> devnull, so
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush stays quiet
        return EXIT_OK
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            log.exception("%s failed", prog)
        else:
            sys.stderr.write(
                f"{prog}: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)\n"
            )
        return EXIT_INTERNAL
