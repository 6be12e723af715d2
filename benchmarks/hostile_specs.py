"""Specs made to exhaust the planner, each timed through ``ctfactory plan`` as a person runs it
(a fresh process: exit status, wall time, peak memory, the first line of its error).

    .venv/bin/python benchmarks/hostile_specs.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "cohorts" / "demo.yaml").read_text()


def cases() -> dict[str, str]:
    """Name -> spec text: the demo spec grown to a size, or hostile in shape."""
    bomb = 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    pad = "# " + "x" * 97 + "\n"
    wide = "".join(f"k{i}: {i}\n" for i in range(90_000))
    return {
        "demo (baseline)": DEMO,
        "demo + 250 KB of comments": DEMO + pad * (250_000 // len(pad)),
        "250 KB of unknown keys": DEMO + wide[: 250_000 - len(DEMO)].rsplit("\n", 1)[0] + "\n",
        "1 MB spec": DEMO + pad * (1_000_000 // len(pad)),
        "5 MB spec": DEMO + pad * (5_000_000 // len(pad)),
        "50 MB spec": DEMO + pad * (50_000_000 // len(pad)),
        "nested aliases (10^9 nodes)": DEMO + bomb,
        "flow lists 100,000 deep": DEMO + "deep: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "unclosed quote": DEMO.replace("style: report", 'style: "report'),
    }


def run(text: str, folder: Path) -> tuple[int, float, float, str]:
    """(exit status, seconds, peak MiB of the child, first error line) of ``ctfactory plan``;
    the seconds include the process's start (about 0.7 s here), as a person waits for it."""
    spec = folder / "spec.yaml"
    spec.write_text(text)
    exe = Path(sys.executable).parent / "ctfactory"
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [str(exe), "plan", str(spec)], stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        first = (err.read().strip().splitlines() or [""])[0]
    return (
        proc.returncode,
        seconds,
        usage.ru_maxrss / 1024,
        first.replace(str(spec), "spec.yaml")[:150],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'case':32} {'bytes':>11} {'exit':>4} {'s':>6} {'MiB':>6}  message")
        for name, text in cases().items():
            code, seconds, peak, first = run(text, Path(tmp))
            size = len(text.encode())
            print(f"{name:32} {size:>11,} {code:>4} {seconds:>6.2f} {peak:>6.0f}  {first}")


if __name__ == "__main__":
    main()
