"""The factory on several nodes of one machine (``ray.cluster_utils.Cluster``, as Ray's own tests
do): a CPU head and worker nodes with one logical GPU each (torch runs on CPU underneath). An
elastic actor pool grows onto added nodes and survives losing one; with no GPU node left a run
stops within its stated bound and a re-run after nodes return completes the cohort. Drivers run
as CLI processes joined to the cluster by RAY_ADDRESS, writing to a real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import s3fs

from factory.store.reader import open_cohort
from tests.conftest import ROOT, ctfactory_bin
from tests.store_helpers import small_model, write_spec
from tests.test_pipeline_ray import assert_complete

NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def nodes():
    """The cluster and its GPU worker nodes (a list the tests add to and remove from)."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "object_store_memory": 80 * 2**20},
    )
    workers = [cluster.add_node(**NODE)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model(tmp_path_factory.mktemp("model") / "small")


def generate(cluster, s3, spec, url, *extra: str) -> subprocess.Popen:
    flags = ["--endpoint-url", s3["options"]["endpoint_url"]]
    flags += ["--storage-option", "key=testing", "--storage-option", "secret=testing"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    argv = [*ctfactory_bin(), "generate", str(spec), "--out", url, *flags, *extra]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def finished(run: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The driver's stdout and stderr once it exits; killed if it outlives ``timeout``."""
    try:
        return run.communicate(timeout=timeout)
    finally:
        run.kill()


def makers(s3, url: str) -> dict[str, str]:
    """volume id -> the node id that committed it, from the completion markers."""
    fs = s3fs.S3FileSystem(**s3["options"], skip_instance_cache=True)
    path = url.removeprefix("s3://") + "/committed"
    found = {}
    for marker in fs.glob(f"{path}/*.json"):
        try:
            row = json.loads(fs.cat_file(marker))
        except (FileNotFoundError, ValueError):
            continue
        found[row["volume_id"]] = row["node_id"]
    return found


def wait_until(condition, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {details()}"
        time.sleep(0.5)


def test_the_pool_grows_onto_added_nodes_and_survives_losing_one(nodes, model, s3, tmp_path):
    cluster, workers = nodes
    url = "s3://cohorts/multinode"
    spec = write_spec(tmp_path / "spec.yaml", model, n=32, output=url)
    run = generate(cluster, s3, spec, url, "--workers", "1-3", "--gpus-per-worker", "1",
                   "--batch-size", "1")  # fmt: skip
    try:
        wait_until(lambda: makers(s3, url), 240, "the first committed volume")
        workers += [cluster.add_node(**NODE), cluster.add_node(**NODE)]
        ids = {w.node_id for w in workers}
        # The elastic pool grows: volumes come from all three GPU nodes (one actor per GPU).
        seen: list[tuple[int, int]] = []

        def grown() -> bool:
            made = makers(s3, url)
            seen.append((len(made), len(set(made.values()))))
            return set(made.values()) == ids

        wait_until(grown, 360, "volumes from 3 nodes", lambda: f"(volumes, nodes) seen: {seen}")
        cluster.remove_node(workers.pop(0), allow_graceful=False)
    except BaseException:
        run.kill()
        raise
    out, err = finished(run, 300)
    assert run.returncode == 0, err
    assert "32 of 32 in the cohort" in out
    assert_complete(url, s3["options"])
    manifest = open_cohort(url, s3["options"]).manifest
    assert set(manifest["node_id"]) == ids  # the head never generates
    assert manifest["volume_id"].is_unique and len(manifest) == 32
    assert manifest["actor_id"].nunique() >= 3 and manifest["host"].notna().all()
    record = open_cohort(url, s3["options"]).volume(manifest["volume_id"].iloc[0]).record
    assert record["made_by"]["node_id"] == manifest["node_id"].iloc[0]


def test_with_no_gpu_node_left_the_run_stops_then_a_rerun_completes(nodes, model, s3, tmp_path):
    cluster, workers = nodes
    while workers:
        cluster.remove_node(workers.pop(), allow_graceful=False)
    url = "s3://cohorts/stalled"
    spec = write_spec(tmp_path / "spec.yaml", model, n=2, output=url)
    start = time.monotonic()
    run = generate(cluster, s3, spec, url, "--gpus-per-worker", "1", "--node-wait", "10")
    out, err = finished(run, 180)
    stopped_after = time.monotonic() - start
    assert run.returncode == 1, out + err
    assert "no node of the cluster can run a generator actor (each needs 1 GPU)" in err
    assert "re-run the same command" in err
    assert stopped_after < 150, stopped_after  # 10 s of waiting, start-up, planning: no hang

    workers.append(cluster.add_node(**NODE))
    again = generate(cluster, s3, spec, url, "--gpus-per-worker", "1", "--node-wait", "10")
    out, err = finished(again, 300)
    assert again.returncode == 0, err
    assert "2 of 2 in the cohort" in out
    assert_complete(url, s3["options"])
