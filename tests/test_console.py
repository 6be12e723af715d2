"""What a run's console shows: a library's lines (Python logging, native writes to fd 2,
warnings) go to the run's log; ct-factory's own progress stays on the console."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from factory.console import collected

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from factory.console import libraries_to_log

    logging.getLogger("lib").addHandler(logging.StreamHandler())  # set up at import, as Ray's
    with libraries_to_log(sys.argv[1] if sys.argv[1] != "-" else None) as console:
        logging.getLogger("lib").warning("lib: INFO line")
        os.write(2, b"native core_worker line\\n")
        warnings.warn("a library warning")
        print("ours: 3/4 volumes", file=console)
    print("after: back on stderr", file=sys.stderr)
    """
)


def run(log: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, log], capture_output=True, text=True, check=True
    )


def test_library_lines_go_to_the_log_and_ours_to_the_console(tmp_path):
    log = tmp_path / "logs" / "run.log"
    done = run(str(log))
    assert done.stderr.splitlines() == ["ours: 3/4 volumes", "after: back on stderr"]
    text = log.read_text()
    for line in ("lib: INFO line", "native core_worker line", "a library warning"):
        assert line in text, line
    assert "ours" not in text


def test_verbose_leaves_everything_on_the_console():
    done = run("-")
    for line in ("lib: INFO line", "native core_worker line", "a library warning", "ours: 3/4"):
        assert line in done.stderr, line


class Noted(UserWarning):
    pass


def test_collected_keeps_every_warning_of_its_kind_and_shows_the_rest():
    with pytest.warns(DeprecationWarning, match="other"), collected(Noted) as found:
        for i in range(3):
            warnings.warn(Noted(f"batch {i}"), stacklevel=1)  # repeats are kept, not merged
        warnings.warn("other", DeprecationWarning, stacklevel=1)
    assert [str(w) for w in found] == ["batch 0", "batch 1", "batch 2"]
