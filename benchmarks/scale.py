"""The factory at scale (docs/scale.md): the whole pipeline with a null generator (a constant
volume, at once) into local disk or an S3 API server on 127.0.0.1 that counts its requests;
the driver is killed with SIGKILL halfway and the same run is started again.

    .venv/bin/python benchmarks/scale.py --n 100000 --store local
    .venv/bin/python benchmarks/scale.py --n 5000 --store s3

Prints one markdown row per phase (first run until the kill, the re-run): wall time, ms per
volume, the driver's peak RSS, manifest parts, recovery (re-run start to its first new volume)
and, on S3, requests per volume by kind. Then checks every planned volume is committed once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generation import spec_file  # noqa: E402
from benchmarks.standin import NullGenerator  # noqa: E402
from tests.s3counter import KINDS, CountingServer  # noqa: E402


def drive(args: argparse.Namespace) -> None:
    """The driver (a process of its own, so that it can be killed): one line per result batch."""
    import resource

    from factory.pipeline import generate_cohort, prepare_run

    options = json.loads(args.options)
    start = time.perf_counter()
    run = prepare_run(args.spec, out=args.out, storage_options=options)
    event = {"event": "prepared", "t": time.time(), "s": time.perf_counter() - start}
    event |= {"done_before": run.done_before, "recovered": run.recovered}
    print(json.dumps(event), flush=True)
    written = 0

    def progress(rows: list[dict]) -> None:
        nonlocal written
        written += len(rows)
        print(json.dumps({"event": "progress", "t": time.time(), "written": written}), flush=True)

    totals = generate_cohort(
        run, workers=args.workers, batch_size=args.batch_size, loader=NullGenerator,
        progress=progress,
    )  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"event": "done", "t": time.time(), "parts": totals.manifest_parts,
                      "written": totals.written, "peak": peak}), flush=True)  # fmt: skip


class Phase:
    """One driver process: its events as they come, its peak RSS (polled), killed on demand."""

    def __init__(self, argv: list[str], env: dict, kill_at: int | None):
        self.start = time.time()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        self.events: list[dict] = []
        self.peak = 0
        self.kill_at = kill_at
        watcher = threading.Thread(target=self._watch_memory, daemon=True)
        watcher.start()
        last_line = 0.0
        for line in self.proc.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == "progress" and time.monotonic() - last_line > 30:
                last_line = time.monotonic()
                rate = event["written"] / max(event["t"] - self.start, 1e-9)
                print(f"  {event['written']:,} volumes after {event['t'] - self.start:.0f} s "
                      f"({rate:.0f}/s)", file=sys.stderr, flush=True)  # fmt: skip
            if kill_at is not None and event.get("written", 0) >= kill_at:
                self.proc.send_signal(signal.SIGKILL)
                break
        self.proc.wait()
        self.end = time.time()

    def _watch_memory(self) -> None:
        proc = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                self.peak = max(self.peak, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.5)

    def first(self, kind: str) -> dict:
        return next(e for e in self.events if e["event"] == kind)

    def written(self) -> int:
        progress = [e for e in self.events if e["event"] == "progress"]
        return progress[-1]["written"] if progress else 0


def bytes_per_volume(url: str, options: dict, n: int) -> str:
    """What the cohort's index costs a volume: manifest parts and completion markers."""
    from factory.store.fs import open_fs

    fs, path = open_fs(url, options)
    sizes = {part: fs.du(f"{path}/{part}", total=True) / n for part in ("manifest", "committed")}
    return ", ".join(f"{part} {size:,.0f} B" for part, size in sizes.items())


def committed_once(url: str, options: dict, n: int) -> str:
    """'yes' when the manifest holds each planned volume exactly once (read independently)."""
    from factory.store.reader import open_cohort

    manifest = open_cohort(url, options).manifest
    ok = len(manifest) == n and manifest["volume_id"].is_unique
    return "yes" if ok else f"NO ({len(manifest)} rows, {manifest['volume_id'].nunique()} ids)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="builtin:demo")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A cluster outside the driver, as on a real one: killing the driver leaves it up.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.workers + 2})
    server = CountingServer() if args.store == "s3" else None
    with tempfile.TemporaryDirectory() as tmp:
        if server is None:
            url, options = str(Path(tmp) / "cohort"), {}
        else:
            import s3fs

            url, options = "s3://scale/cohort", server.options
            s3fs.S3FileSystem(**options).mkdir("scale")
        spec = spec_file(Path(tmp), args.n, args.model, url)
        argv = [sys.executable, __file__, "drive", str(spec), url, json.dumps(options),
                str(args.workers), str(args.batch_size)]  # fmt: skip
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
        print(
            f"scale: {args.n:,} null volumes into {args.store} ({url}), {args.workers} "
            f"actors, batches of {args.batch_size}; SIGKILL at {args.n // 2:,}",
            flush=True,
        )
        rows = []
        for name, kill_at in (("until SIGKILL", args.n // 2), ("re-run", None)):
            before = server.counts() if server else {}
            phase = Phase(argv, env, kill_at)
            after = server.counts() if server else {}
            prepared = phase.first("prepared")
            new = phase.written()
            progress = [e for e in phase.events if e["event"] == "progress"]
            done = [e for e in phase.events if e["event"] == "done"]
            peak = done[0]["peak"] if done else phase.peak
            steady = (progress[-1]["t"] - progress[0]["t"]) / max(new - progress[0]["written"], 1)
            row = {
                "phase": name,
                "volumes": new,
                "wall_s": phase.end - phase.start,
                "ms_per_volume": 1000 * steady,
                "peak_mib": peak / 2**20,
                "parts": done[0]["parts"] if done else "-",
                "recovery_s": progress[0]["t"] - phase.start if prepared["done_before"] else None,
                "prepare_s": prepared["s"],
                "done_before": prepared["done_before"],
                "recovered": prepared["recovered"],
            }
            if server:
                row["requests"] = {k: (after[k] - before[k]) / max(new, 1) for k in KINDS}
            rows.append(row)
            print(json.dumps(row), flush=True)
        exact = committed_once(url, options, args.n)
        index = bytes_per_volume(url, options, args.n)
    cluster.shutdown()
    ray.shutdown()
    if server:
        server.stop()

    print(f"\n{args.n:,} volumes, store {args.store}, every volume exactly once: {exact}")
    print(f"index bytes per volume: {index}\n")
    head = ("| phase | volumes the driver saw | wall (s) | ms per volume (steady) "
            "| driver peak RSS (MiB) | manifest parts | committed before | manifest rows recovered "
            "| plan + recover (s) | re-run start to first new volume (s) |")  # fmt: skip
    if server:
        head += " " + " | ".join(f"{k} per volume" for k in KINDS[:4]) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["phase"], f"{r['volumes']:,}", f"{r['wall_s']:.0f}", f"{r['ms_per_volume']:.1f}",
                 f"{r['peak_mib']:.0f}", str(r["parts"]), f"{r['done_before']:,}",
                 f"{r['recovered']:,}", f"{r['prepare_s']:.1f}",
                 "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"]  # fmt: skip
        if server:
            cells += [f"{r['requests'][k]:.1f}" for k in KINDS[:4]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":
        keys = ("spec", "out", "options", "workers", "batch_size")
        values = dict(zip(keys, sys.argv[2:], strict=True))
        values["workers"], values["batch_size"] = int(values["workers"]), int(values["batch_size"])
        drive(argparse.Namespace(**values))
    else:
        main()
