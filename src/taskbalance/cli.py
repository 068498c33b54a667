"""The ``taskbalance`` command (also ``python -m taskbalance``).

Subcommands: ``methods`` lists every registered method with its level and paper line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import registry


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _methods(_: argparse.Namespace) -> int:
    rows: list[tuple[str, str, str]] = []
    for name in registry.LOSS_METHODS:
        rows.append(("loss", name, _summary(registry.loss_class(name))))
    for name, preset in registry.LOSS_PRESETS.items():
        rows.append(("loss", name, f"{preset.base} with {preset.options}"))
    for name in registry.GRADIENT_METHODS:
        rows.append(("gradient", name, _summary(registry.gradient_class(name))))
    for name, preset in registry.GRADIENT_PRESETS.items():
        rows.append(("preset", name, f"{preset.loss}+{preset.base}"))
    width = max(len(name) for _, name, _ in rows)
    for level, name, summary in rows:
        print(f"{level:<9} {name:<{width}}  {summary}")
    print("\nCombine a loss method and a gradient method with '+', e.g. igbv1+nashmtl.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskbalance", description="Task balancing for multi-task learning (loss level × gradient level)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods = commands.add_parser("methods", help="list the registered balancing methods")
    methods.set_defaults(handler=_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    status: int = handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
