"""What one volume costs in object-store requests, counted at an S3 API server on 127.0.0.1.

A volume with masks is seven objects: its group, the HU array and shard, the labels and anatomy
groups, the label array and shard. Writing it must cost those PUTs, the completion marker's
conditional PUT and the one GET that looks for a marker first (a retried task must not write a
committed volume again): no LIST, no HEAD, nothing read back. These tests fail when that grows.
"""

from __future__ import annotations

import pytest

from factory.pipeline import VolumeWriter, prepare_run
from factory.store.reader import open_cohort
from tests.s3counter import CountingServer
from tests.store_helpers import small_model, write_spec

BUDGET = {"PUT": 8, "GET": 1, "HEAD": 0, "LIST": 0, "DELETE": 0, "OTHER": 0}  # per volume


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A counting S3 server with a bucket, a prepared 8-volume cohort on it, and a writer."""
    import s3fs

    base = tmp_path_factory.mktemp("requests")
    server = CountingServer()
    s3fs.S3FileSystem(**server.options, skip_instance_cache=True).makedirs("cohorts", exist_ok=True)
    model = small_model(base / "model")
    spec = write_spec(base / "spec.yaml", model, n=8, output="s3://cohorts/counted")
    run = prepare_run(str(spec), storage_options=server.options)
    writer = VolumeWriter(run.url, server.options, run.settings, threads=2)
    yield server, run, writer
    server.stop()


def test_a_volume_costs_eight_puts_one_get_and_no_listing(counted):
    server, run, writer = counted
    before = server.counts()
    rows = writer(run.todo.slice(0, 3)).to_pylist()
    spent = server.since(before)
    assert [r["status"] for r in rows] == ["written"] * 3
    assert spent == {kind: 3 * n for kind, n in BUDGET.items()}, spent
    # The stored size comes from what was written, and is what the store holds.
    store = writer.store
    for row in rows:
        assert row["bytes_stored"] == store.fs.du(store.volume_path(row["volume_id"])) > 0
    # Read back by an independent reader: the volumes are whole and match their rows.
    store.write_manifest(rows)
    assert open_cohort(run.url, storage_options=server.options).check() == []


def test_a_retried_batch_of_committed_volumes_costs_one_get_each(counted):
    server, run, writer = counted
    batch = run.todo.slice(3, 2)
    writer(batch)
    before = server.counts()
    again = writer(batch).to_pylist()  # what a task retried after its actor died does
    assert [r["status"] for r in again] == ["skipped"] * 2
    assert server.since(before) == {kind: 2 * (kind == "GET") for kind in BUDGET}
