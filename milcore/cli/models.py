"""``milcore models``: the registered aggregators (``--model`` / ``--models`` values), one line each."""

from __future__ import annotations

import argparse
import dataclasses

HELP = "list the aggregators that train, bench and continual accept (NAME: its --model-arg keys)"

#: Config fields every aggregator has, set by the trainer rather than by ``--model-arg``.
_SET_BY_TRAINER = ("in_dim", "num_classes")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``models`` subcommand."""
    p = subparsers.add_parser("models", help=HELP, description=HELP + ".", parents=parents)
    p.add_argument("name", nargs="?", default=None, metavar="NAME",
                   help="show this aggregator's options (--model-arg KEY=VALUE) with their defaults")  # fmt: skip
    p.set_defaults(func=run)


def describe_models() -> list[str]:
    """``name  summary`` lines for every registered aggregator, names aligned."""
    from milcore.models import get_aggregator_entry, list_aggregators

    names = list_aggregators()
    width = max((len(n) for n in names), default=0)
    return [f"{n:<{width}}  {get_aggregator_entry(n).summary}" for n in names]


def describe_options(name: str) -> list[str]:
    """``key = default`` lines of one aggregator's ``--model-arg`` options.

    Raises:
        InvalidArgumentError: an unknown name (with close matches).
    """
    from milcore.models import get_aggregator_entry

    entry = get_aggregator_entry(name)
    lines = [f"{name}: {entry.summary}"]
    needs = _needs(entry.needs)
    if needs:
        lines.append(f"needs: {needs}")
    lines.append("options (--model-arg KEY=VALUE):")
    for f in dataclasses.fields(entry.config_class):
        if f.name in _SET_BY_TRAINER:
            continue
        lines.append(f"  {f.name} = {_scalar(f.default)}")
    return lines


def _needs(needs: object) -> str:
    """What an aggregator declares it needs, in words (empty when nothing)."""
    words = []
    if getattr(needs, "coords", False):
        words.append("cell coordinates (used when the bank has them)")
    if getattr(needs, "control_class", None):
        words.append(f"control bags (label set by {needs.control_class})")  # type: ignore[attr-defined]
    hooks = sorted(getattr(needs, "hooks", ()))
    if hooks:
        words.append(f"epoch hook ({', '.join(hooks)})")
    if not getattr(needs, "permutation_invariant", True):
        words.append("cell order (not permutation invariant)")
    return "; ".join(words)


def _scalar(value: object) -> str:
    """A default as it is written in ``--model-arg KEY=VALUE`` (YAML scalars)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def run(args: argparse.Namespace) -> int:
    """Print the list (or one aggregator's options) to stdout; returns 0."""
    lines = describe_options(args.name) if args.name else describe_models()
    print("\n".join(lines))
    return 0
