"""Faults of the store without Ray: the write lease between runs (local disk and S3 through
moto), a full disk, and an object store down for longer than the retry budget."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from factory.pipeline import VolumeWriter, prepare_run
from factory.store.cohort import CohortStore
from factory.store.fs import open_fs
from factory.store.lease import CohortBusyError, Holder, Lease
from tests.conftest import ROOT
from tests.store_helpers import small_model, write_spec


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_model(tmp_path_factory.mktemp("model") / "small")


HOLD = (
    "import sys, time\nfrom factory.store.fs import open_fs\n"
    "from factory.store.lease import Lease\nfs, path = open_fs(sys.argv[1])\n"
    "lease = Lease(fs, path, sys.argv[1])\n"
    "lease.acquire(); lease.keep_alive()\nprint('held', flush=True)\ntime.sleep(600)\n"
)


def hold_lease(url: str, ttl: float) -> subprocess.Popen:
    """Another process holding the cohort's lease (with this time-to-live) until killed."""
    env = {**os.environ, "CTFACTORY_LEASE_TTL_S": str(ttl)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_lease_refuses_a_second_run_and_a_killed_ones_is_taken_at_once(tmp_path):
    url = str(tmp_path / "cohort")
    fs, path = open_fs(url)
    holder = hold_lease(url, ttl=2.0)
    try:
        time.sleep(1.0)  # past half its time-to-live: only its heartbeat keeps it live
        with pytest.raises(CohortBusyError) as refused:
            Lease(fs, path, url).acquire()
        message = str(refused.value)
        assert f"another run is writing this cohort (host {os.uname().nodename}" in message
        assert f"process {holder.pid}, started 20" in message and "expires" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lease = Lease(fs, path, url)
    lease.acquire()  # its process is gone from this host: no need to wait for the expiry
    assert lease.generation == 2
    assert sorted(os.listdir(tmp_path / "cohort" / "lease")) == ["000000002.json"]
    lease.release()
    again = Lease(fs, path, url)
    again.acquire()  # released: taken at once
    assert again.generation == 3


def test_the_lease_of_a_run_on_another_machine_holds_until_it_expires(tmp_path):
    url = str(tmp_path / "cohort")
    fs, path = open_fs(url)
    remote = Holder("r", "gpu-node-7", 4121, time.time(), time.time(), 60.0)
    (tmp_path / "cohort" / "lease").mkdir(parents=True)
    lease_file = tmp_path / "cohort" / "lease" / "000000001.json"
    lease_file.write_text(json.dumps(asdict(remote)))
    with pytest.raises(CohortBusyError, match=r"\(host gpu-node-7, process 4121, started "):
        Lease(fs, path, url).acquire()
    remote.renewed_at -= 61  # no heartbeat for longer than its time-to-live
    lease_file.write_text(json.dumps(asdict(remote)))
    lease = Lease(fs, path, url)
    lease.acquire()
    assert lease.generation == 2


def test_a_holder_that_was_taken_over_stops_at_its_next_heartbeat(tmp_path):
    url = str(tmp_path / "cohort")
    fs, path = open_fs(url)
    first = Lease(fs, path, url)
    first.acquire()
    first.check()  # held: nothing to say
    second = Lease(fs, path, url)
    second.acquire()  # this process's own lease is taken over (a second prepare_run)
    first.renew()
    with pytest.raises(CohortBusyError, match=r"write lease was taken over by host .*; stopping"):
        first.check()
    second.renew()
    second.check()


def test_racing_runs_on_s3_get_one_lease_between_them(s3):
    """Runs that find the same expired lease race to create the next number: the conditional
    PUT lets exactly one of them win."""
    url = "s3://cohorts/raced"
    fs = fsspec.filesystem("s3", **s3["options"], skip_instance_cache=True)
    results: list[object] = []
    start = threading.Barrier(4)

    def take() -> None:
        lease = Lease(fs, "cohorts/raced", url)
        start.wait()
        try:
            lease.acquire()
            results.append(lease.generation)
        except CohortBusyError as exc:
            results.append(exc)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, int)]
    assert won == [1], results
    assert all("another run is writing this cohort" in str(r) for r in results if r not in won)


class FullDisk(fsspec.AbstractFileSystem):
    """Local files through fsspec, with room for ``room`` more bytes: a write past it raises
    ENOSPC as a full disk does, having written nothing."""

    protocol = "fulldisk"
    room = 1 << 40
    refused = 0  # writes refused for want of room

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.local = LocalFileSystem()

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode == "create" and os.path.exists(path):
            raise FileExistsError(path)
        if len(value) > FullDisk.room:
            FullDisk.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        FullDisk.room -= len(value)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_bytes(value)

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self.local.cat_file(path, start, end)

    def ls(self, path, detail=True, **kwargs):
        return self.local.ls(path, detail=detail)

    def info(self, path, **kwargs):
        return self.local.info(path)

    def rm(self, path, recursive=False, maxdepth=None):
        self.local.rm(path, recursive=recursive)

    def makedirs(self, path, exist_ok=False):
        self.local.makedirs(path, exist_ok=exist_ok)


def test_a_full_disk_names_the_volume_and_store_commits_nothing_half_and_a_rerun_completes(
    model, tmp_path, monkeypatch
):
    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    monkeypatch.setattr(FullDisk, "room", 1 << 40)
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", model, n=4, output=str(out))
    run = prepare_run(str(spec))
    full = f"fulldisk://{out}"
    writer = VolumeWriter(full, {}, run.settings, threads=2)
    first = writer(run.todo.slice(0, 1)).to_pylist()
    assert [r["status"] for r in first] == ["written"]
    monkeypatch.setattr(FullDisk, "room", 4096)  # the disk fills during the next volume
    monkeypatch.setattr(FullDisk, "refused", 0)
    rows = writer(run.todo.slice(1, 2)).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert FullDisk.refused == 2  # once a volume: no retries spent on a full disk
    for row in rows:
        assert row["error"].startswith(
            f"{full}: volume {row['volume_id']}: writing its arrays: failed: No space left on "
            "device (ENOSPC); make room on the store"
        ), row["error"]
    store = CohortStore(str(out))
    store.write_manifest(first)
    status = store.status()
    # the failed ones uncommitted: half-written (the first) or not begun (the disk was full)
    assert (status.done, status.partial + status.missing) == (1, 3) and status.partial >= 1
    assert store.check() == []
    run.release()
    rerun = prepare_run(str(spec))  # room again: the re-run writes only what is missing
    assert rerun.todo.num_rows == 3 and rerun.done_before == 1
    done = VolumeWriter(rerun.url, {}, rerun.settings, threads=2)(rerun.todo).to_pylist()
    assert {r["status"] for r in done} == {"written"}
    store.write_manifest(done)
    assert store.check() == [] and store.status().done == 4
    rerun.release()


def test_an_object_store_down_past_the_retry_budget_fails_the_volume_and_loses_nothing(
    model, tmp_path, s3, monkeypatch
):
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("CTFACTORY_WRITE_RETRIES", "2")  # about 1.5 s of retries
    monkeypatch.setenv("CTFACTORY_LEASE_TTL_S", "2")  # a heartbeat every 0.5 s
    # botocore's own retries off: the budget under test is the factory's
    options = {**s3["options"], "config_kwargs": {"retries": {"max_attempts": 1}}}
    spec = write_spec(tmp_path / "spec.yaml", model, n=3, output="s3://cohorts/down")
    run = prepare_run(str(spec), storage_options=options)
    writer = VolumeWriter(run.url, options, run.settings, threads=2)
    first = writer(run.todo.slice(0, 1)).to_pylist()
    s3["server"].stop()
    try:
        second = writer(run.todo.slice(1, 1)).to_pylist()[0]
        deadline = time.time() + 30
        with pytest.raises(CohortBusyError, match="could not renew its write lease for 2 s"):
            while time.time() < deadline:  # the heartbeats fail: the driver would stop
                run.lease.check()
                time.sleep(0.1)
    finally:
        s3["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=s3["port"])
        s3["server"].start()
    assert second["status"] == "failed"
    assert second["error"].startswith(f"s3://cohorts/down: volume {second['volume_id']}: ")
    assert "failed after 3 attempts" in second["error"]
    store = CohortStore(run.url, options)
    store.write_manifest(first)
    assert store.check() == [] and store.status().done == 1  # the committed volume is intact
    rerun = prepare_run(str(spec), storage_options=options)
    assert rerun.todo.num_rows == 2
    rows = VolumeWriter(rerun.url, options, rerun.settings, threads=2)(rerun.todo).to_pylist()
    store.write_manifest(rows)
    assert store.check() == [] and store.status().done == 3
    run.release()
    rerun.release()
