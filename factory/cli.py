"""The ``ctfactory`` command: one subcommand per capability, each in its own module.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run(args) -> int``. Packages built on ``factory`` (``train``, ``serve``) add their
commands through the ``ctfactory.commands`` entry-point group: ``factory`` never imports
them. Bad input raises a :class:`factory.errors.CtFactoryError`, printed as one line naming
the file, key or option and what is valid, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from factory.console import HelpFormatter, report_errors

# Command modules in the order ``ctfactory --help`` lists them; plug-ins follow, by name.
COMMAND_MODULES: tuple[str, ...] = (
    "factory.phantom.cli",
    "factory.plan",
    "factory.generate",
    "factory.store.cli",
    "factory.viewer.cli",
    "factory.evaluate.cli",
    "factory.card",
    "factory.import_model",
    "factory.segment",
)
PLUGIN_GROUP = "ctfactory.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctfactory",
        description="ct-factory: synthetic, labelled 3D chest CT (phantoms, cohorts, models).",
        formatter_class=HelpFormatter,
        epilog="Run 'ctfactory COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        entry.load().register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return report_errors(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
