"""Cohort planning at scale: wall time and peak memory of ``ctfactory plan`` per example cohort.

Each example cohort is scaled to ``--n`` volumes (its counts scaled with it) and planned in a
fresh process with ``--out``, as a user runs it; peak RSS is the child's own (``wait4``).
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CTFACTORY = Path(sys.executable).with_name("ctfactory")
EXAMPLES = ("demo", "balanced-18", "effusion-enriched", "match-reference")


def scaled(name: str, n: int) -> dict:
    """The example spec with ``n`` volumes, its counts scaled and input paths made absolute."""
    spec = yaml.safe_load((ROOT / "cohorts" / f"{name}.yaml").read_text())
    factor = n / spec["cohort"]["n"]
    spec["cohort"]["n"] = n
    joint = spec.get("joint", {})
    for item in [
        *spec.get("labels", {}).values(),
        *joint.get("profiles", []),
        *joint.get("constraints", []),
    ]:
        if "count" in item:
            item["count"] = round(item["count"] * factor)
    reference = spec.get("reference")
    if isinstance(reference, dict):
        reference["labels_csv"] = str(ROOT / "cohorts" / reference["labels_csv"])
    return spec


def measure(spec: dict, folder: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one ``ctfactory plan --out`` run."""
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.perf_counter()
    child = subprocess.Popen(
        [str(CTFACTORY), "plan", str(path), "--out", str(folder / "plan.parquet")],
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"ctfactory plan failed for {spec['cohort']['id']}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="volumes per cohort")
    args = parser.parse_args()
    print("| cohort (prompt style) | volumes | wall time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in EXAMPLES:
            n = 16 if name == "demo" else args.n
            spec = scaled(name, n)
            seconds, peak = measure(spec, Path(tmp))
            style = spec.get("prompt", {}).get("style", "report")
            print(f"| {name} ({style}) | {n:,} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
