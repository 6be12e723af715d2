"""What a ``ctfactory`` command shows a person: help text layout, and one error line.

Commands raise :class:`factory.errors.CtFactoryError` (or a subclass) for anything a person
can fix; :func:`report_errors` prints it as ``ctfactory COMMAND: error: ...`` with exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from factory.errors import CtFactoryError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep example blocks as written and show defaults."""


def report_errors(command: str, run: Callable[[], int]) -> int:
    """Run a command: its status, 2 for a ct-factory error (one line), 130 on Ctrl-C."""
    try:
        return int(run() or 0)
    except CtFactoryError as exc:
        print(f"ctfactory {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctfactory {command}: interrupted", file=sys.stderr)
        return 130
