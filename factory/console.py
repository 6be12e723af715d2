"""What a ``ctfactory`` command shows a person: help text layout, one error line, and a console
kept for ct-factory's own progress.

Commands raise :class:`factory.errors.CtFactoryError` (or a subclass) for anything a person
can fix; :func:`report_errors` prints it as ``ctfactory COMMAND: error: ...`` with exit 2.
While a run works, :func:`libraries_to_log` sends what Ray, Ray Data, transformers and MONAI
print to the run's log file, so the console shows progress, plain warnings and the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from factory.errors import CtFactoryError
from factory.refs import is_local, local_path

LOGS = "logs"  # under a run (a cohort, a training run): one file of library messages per run


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


@contextlib.contextmanager
def libraries_to_log(path: str | Path | None) -> Iterator[TextIO]:
    """While the body runs, everything written to this process's standard error goes to the
    file ``path`` (appended): Ray's and Ray Data's log lines, native lines of Ray's core
    worker, actors' output that Ray forwards, library warnings and progress bars. Yields a
    stream to the console for ct-factory's own progress. ``path`` None (``--verbose``)
    changes nothing and yields ``sys.stderr``.

    It works on file descriptor 2 as well as on ``sys.stderr``: native code and the logging
    handlers libraries set up at import write to the descriptor directly.
    """
    if path is None:
        yield sys.stderr
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    stream = sys.stderr
    with (
        open(path, "ab") as log,
        # Python-level writers that look sys.stderr up when they write (warnings, progress bars
        # made inside the body, Ray's forwarded worker lines) go there too, wherever fd 2 is.
        open(os.dup(log.fileno()), "w", buffering=1, encoding="utf-8") as python_log,
    ):
        os.dup2(log.fileno(), 2)
        sys.stderr = python_log
        try:
            yield console
        finally:
            sys.stderr = stream
            python_log.flush()
            os.dup2(saved, 2)
            os.close(saved)
            console.close()


def run_log(url: str, command: str) -> Path:
    """Where a run's library messages go while it runs: ``logs/`` under a local run, else a
    local file that :func:`keep_log` copies under the run at the end."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{command}-{stamp}-{os.getpid()}-{secrets.token_hex(2)}.log"  # never two runs' log
    if is_local(url):
        return Path(local_path(url)) / LOGS / name
    return Path(tempfile.gettempdir()) / "ct-factory" / name


def keep_log(log: Path, url: str, put: Callable[[str, bytes], None]) -> str:
    """Where the run's log stays, copied under a remote run with ``put(relative name, bytes)``
    first: the location to name at the end of the run."""
    if is_local(url):
        return str(log)
    if not log.is_file():
        return "(none written)"
    try:
        put(f"{LOGS}/{log.name}", log.read_bytes())
    except Exception as exc:  # the run's result stands; only the copy failed
        return f"{log} (not copied under {url}: {exc})"
    return f"{url.rstrip('/')}/{LOGS}/{log.name}"


def log_line(where: str) -> str:
    """The last line of a run: where Ray's and the libraries' messages went."""
    return f"log: {where} (Ray's and the libraries' messages; --verbose shows them here)"


@contextlib.contextmanager
def collected(category: type[Warning]) -> Iterator[list[Warning]]:
    """Warnings of ``category`` raised in the body, collected (every one, repeats too) for one
    line at the end of a run instead of one per batch; other warnings show as usual."""
    found: list[Warning] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", category)
        show = warnings.showwarning

        def keep(message, kind, filename, lineno, file=None, line=None):
            if issubclass(kind, category):
                found.append(message)
            else:
                show(message, kind, filename, lineno, file, line)

        warnings.showwarning = keep
        yield found
