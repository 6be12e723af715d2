"""The factory on several nodes of one machine (``ray.cluster_utils.Cluster``, as Ray's own tests
do): a CPU head and worker nodes with one logical GPU each (torch runs on CPU underneath). An
elastic actor pool grows onto added nodes and shrinks when they are lost; with no GPU node left
a run stops within its stated bound and a re-run after nodes return completes the cohort; elastic
training loses a node, goes on with fewer workers and grows back, with everything on S3 and
nothing written locally. Drivers run as CLI processes joined to the cluster by RAY_ADDRESS,
writing to a real S3 server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import s3fs
import yaml

from factory.models.checkpoint import load_checkpoint
from factory.store.reader import open_cohort
from tests.conftest import ROOT, ctfactory_bin
from tests.s3counter import CountingServer, Gate
from tests.store_helpers import small_model, write_spec
from tests.test_pipeline_ray import assert_complete
from tests.train_helpers import config, phantom_split
from train.export import export_model, latest_checkpoint
from train.session import checkpoint_metas

# A GPU worker node; "trainer" keeps training workers on these nodes, off the CPU head.
STEPS = 80  # diffusion steps of the elastic training test: room to shrink and grow back

NODE = {
    "num_cpus": 1,
    "num_gpus": 1,
    "object_store_memory": 80 * 2**20,
    "resources": {"trainer": 1},
}


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


def driver(argv: list[str], env: dict, cwd, console: Path) -> subprocess.Popen:
    """A CLI driver whose stdout and stderr go to files beside ``console`` (a pipe nobody reads
    while the test waits would block it once full)."""
    out, err = console.with_suffix(".out").open("w"), console.with_suffix(".err").open("w")
    run = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env, cwd=cwd)
    run.console = console  # type: ignore[attr-defined]
    return run


def output(run: subprocess.Popen) -> tuple[str, str]:
    console = run.console  # type: ignore[attr-defined]
    return console.with_suffix(".out").read_text(), console.with_suffix(".err").read_text()


def generate(cluster, s3, spec, url, *extra: str) -> subprocess.Popen:
    flags = ["--endpoint-url", s3["options"]["endpoint_url"]]
    flags += ["--storage-option", "key=testing", "--storage-option", "secret=testing"]
    here = Path(spec).parent
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    env |= local_folders(here)
    argv = [*ctfactory_bin(), "generate", str(spec), "--out", url, *flags, *extra]
    return driver(argv, env, here / "work", here / f"driver-{time.monotonic_ns()}")


def local_folders(here: Path) -> dict[str, str]:
    """A driver's working directory (``here/work``) and home, empty, and its caches (models
    from s3://, matplotlib's fonts) elsewhere: with every URL on S3 the first two stay empty."""
    for name in ("work", "home"):
        (here / name).mkdir(exist_ok=True)
    cache = here / "cache"
    env = {"HOME": str(here / "home"), "CTFACTORY_CACHE": str(cache)}
    return env | {"MPLCONFIGDIR": str(cache / "matplotlib")}


def nothing_local(here: Path) -> bool:
    return not any((here / "work").iterdir()) and not any((here / "home").iterdir())


def finished(run: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The driver's stdout and stderr once it exits; killed if it outlives ``timeout``."""
    try:
        run.wait(timeout)
    finally:
        run.kill()
    return output(run)


def makers(s3: dict, url: str) -> dict[str, str]:
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


def wait_until(condition, timeout: float, what: str, details=lambda: "", run=None) -> None:
    """Poll ``condition``; fail after ``timeout`` s, or as soon as the driver ``run`` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {details()}"
        if run is not None and run.poll() is not None:
            out, err = output(run)
            pytest.fail(f"the driver exited ({run.returncode}) before {what}: {out}{err[-4000:]}")
        time.sleep(0.5)


NODE_ID = re.compile(rb'"node_id":"([0-9a-f]+)"')  # in a completion marker's body


@pytest.fixture
def gated():
    """A request-counting S3 server whose gate holds the completion markers' PUTs (closed at
    first): ``(options, gate)``."""
    gate = Gate(r"/committed/[^/]+\.json$")
    server = CountingServer(gate)
    s3fs.S3FileSystem(**server.options, skip_instance_cache=True).makedirs("cohorts", True)
    yield {"options": server.options}, gate
    gate.open()  # let the held requests go before the server stops
    server.stop()


def held_by(gate: Gate) -> set[str]:
    """The nodes whose actors wait at the gate with a volume to commit (from the markers'
    bodies, which hold the manifest row)."""
    return {m.group(1).decode() for b in gate.held() if (m := NODE_ID.search(b))}


def test_the_pool_grows_onto_added_nodes_and_shrinks_when_they_are_lost(
    nodes, model, gated, tmp_path
):
    """Events in order, without racing the clock: the commits wait at the S3 server's gate
    until the pool has an actor on each of three nodes (two added while the run goes on);
    once each node has committed, the gate closes again, so that the run is still going when
    the two added nodes are lost; it finishes on the first."""
    cluster, workers = nodes
    s3, gate = gated
    url = "s3://cohorts/multinode"
    spec = write_spec(tmp_path / "spec.yaml", model, n=24, output=url)
    run = generate(cluster, s3, spec, url, "--workers", "1-3", "--gpus-per-worker", "1",
                   "--batch-size", "1")  # fmt: skip
    try:
        wait_until(lambda: held_by(gate), 240, "a first volume at its commit", run=run)
        workers += [cluster.add_node(**NODE), cluster.add_node(**NODE)]
        ids = {w.node_id for w in workers}
        # The elastic pool grows: an actor on each GPU node (one actor per GPU) holds a volume.
        wait_until(lambda: held_by(gate) == ids, 360, "volumes from 3 nodes at their commit",
                   lambda: f"(held by {held_by(gate)})", run)  # fmt: skip
        gate.open()
        committed_by_all = lambda: set(makers(s3, url).values()) == ids  # noqa: E731
        wait_until(committed_by_all, 120, "committed volumes from 3 nodes", run=run)
        gate.close()
        for added in workers[1:]:  # both lost: the pool shrinks back to the first node
            cluster.remove_node(added, allow_graceful=False)
        del workers[1:]
        gate.open()
    except BaseException:
        run.kill()
        raise
    out, err = finished(run, 300)
    assert run.returncode == 0, err
    assert "24 of 24 in the cohort" in out
    assert_complete(url, s3["options"])
    manifest = open_cohort(url, s3["options"]).manifest
    assert set(manifest["node_id"]) == ids  # the head never generates
    assert manifest["volume_id"].is_unique and len(manifest) == 24
    assert manifest["actor_id"].nunique() >= 3 and manifest["host"].notna().all()
    record = open_cohort(url, s3["options"]).volume(manifest["volume_id"].iloc[0]).record
    assert record["made_by"]["node_id"] == manifest["node_id"].iloc[0]
    assert nothing_local(tmp_path)  # everything went to S3


def test_with_no_gpu_node_left_the_run_stops_then_a_rerun_completes(nodes, model, s3, tmp_path):
    cluster, workers = nodes
    url = "s3://cohorts/stalled"
    spec = write_spec(tmp_path / "spec.yaml", model, n=2, output=url)
    # A minimum that the cluster's GPUs can never hold, and no autoscaler: refused at once.
    least = len(workers) + 1
    span = f"{least}-{least + 1}"
    too_many = generate(cluster, s3, spec, url, "--workers", span, "--gpus-per-worker", "1")
    out, err = finished(too_many, 120)
    assert too_many.returncode == 2, out + err
    assert f"--workers {span}: a minimum of {least} actors at 1 GPU each" in err
    assert f"valid here: a minimum of 1 to {len(workers)}" in err
    while workers:  # now every GPU node is lost
        cluster.remove_node(workers.pop(), allow_graceful=False)
    run = generate(cluster, s3, spec, url, "--gpus-per-worker", "1", "--node-wait", "10")
    # No hang: 10 s of waiting, start-up and planning, or the driver is killed (exit -9).
    out, err = finished(run, 150)
    assert run.returncode == 1, out + err
    assert "no node of the cluster can run a generator actor (each needs 1 GPU)" in err
    assert "re-run the same command" in err

    workers.append(cluster.add_node(**NODE))
    again = generate(cluster, s3, spec, url, "--gpus-per-worker", "1", "--node-wait", "10")
    out, err = finished(again, 300)
    assert again.returncode == 0, err
    assert "2 of 2 in the cohort" in out
    assert_complete(url, s3["options"])


def test_a_serve_replica_on_a_lost_node_is_replaced_and_no_request_hangs(nodes, model, tmp_path):
    """The one generator replica's node is removed under load and another node added: every
    request gets its volume or a 503 with Retry-After (none hangs past the request timeout: the
    client gives up then, and that fails), and the replacement replica serves."""
    from tests.serve.test_ray import Http, free_port

    cluster, workers = nodes
    while len(workers) > 1:
        cluster.remove_node(workers.pop(), allow_graceful=False)
    if not workers:
        workers.append(cluster.add_node(**NODE))
    timeout = 60
    args = {
        "models": {"small": str(model)}, "default_model": "small", "api_key_env": None,
        "gpus_per_replica": 1, "cpus_per_replica": 1,
        "limits": {"default_steps": 2, "max_steps": 2, "request_timeout_s": timeout},
    }  # fmt: skip
    app = {"name": "ct-factory", "route_prefix": "/", "import_path": "serve.app:build_app"}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"applications": [{**app, "args": args}]}))
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    with (tmp_path / "serve.log").open("w") as log:
        # SIGINT stops it below: a background job (`make test &`) ignores SIGINT, and its
        # children inherit that, so the server gets the default back (as in test_cli.py).
        server = subprocess.Popen(
            [*ctfactory_bin(), "serve", "--config", str(tmp_path / "serve.yaml"),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    # A request still unanswered 15 s past the server's timeout hung: it counts as status 0.
    client = Http(f"http://127.0.0.1:{port}", timeout=timeout + 15)
    answers: list[tuple[float, int, str | None]] = []  # (sent, status, Retry-After)
    stop = threading.Event()

    def ask(worker: int) -> None:
        seed = worker * 1000
        while not stop.is_set():
            seed += 1
            sent = time.monotonic()
            try:
                status, headers, _ = client.post(
                    "/v1/previews", {"prompt": "Effusion.", "seed": seed}
                )
                retry = headers.get("Retry-After")
            except OSError as exc:  # refused, reset or timed out: the assertions fail on it
                status, retry = 0, repr(exc)
            answers.append((sent, status, retry))
            if status != 200:
                time.sleep(1)

    askers = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(2)]

    def served_after(moment: float) -> bool:
        return any(sent > moment and status == 200 for sent, status, _ in answers)

    try:

        def ready() -> bool:
            try:
                return client.get("/readyz")[0] == 200
            except OSError:  # not listening yet
                return False

        wait_until(ready, 240, "Serve to be ready", lambda: (tmp_path / "serve.log").read_text())
        for asker in askers:
            asker.start()
        wait_until(lambda: served_after(0), 120, "a first volume")
        lost_at = time.monotonic()
        cluster.remove_node(workers.pop(), allow_graceful=False)
        workers.append(cluster.add_node(**NODE))
        wait_until(lambda: served_after(lost_at + 1), 240, "a volume from the replacement",
                   lambda: str([a[1:] for a in answers[-8:]]))  # fmt: skip
    finally:
        stop.set()
        for asker in askers:  # the last answers come before Serve is stopped
            if asker.is_alive():
                asker.join(timeout + 15)
        server.send_signal(signal.SIGINT)  # stops Serve: its replica holds a node's CPU
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()
    statuses = {status for _, status, _ in answers}
    assert statuses <= {200, 503}, [a for a in answers if a[1] not in (200, 503)]
    assert all(retry for _, status, retry in answers if status == 503), answers


def test_elastic_training_loses_a_node_then_grows_back_with_nothing_local(
    nodes, model, s3, tmp_path
):
    """Diffusion over three nodes with the VAE, latents and checkpoints on S3: a node removed
    mid-run, training goes on from the last checkpoint on two workers with the same global
    batch; the node back, it grows to three again. The driver writes no local file."""
    cluster, workers = nodes
    while len(workers) < 3:
        workers.append(cluster.add_node(**NODE))
    cluster.wait_for_nodes()
    fs = s3fs.S3FileSystem(**s3["options"], skip_instance_cache=True)
    fs.put(str(model), "runs-bucket/models/small", recursive=True)
    data = phantom_split(tmp_path / "phantom", "train", 12, 0)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    cfg = config(
        "diffusion", data, "s3://runs-bucket/elastic", name="diffusion",
        storage_options=s3["options"], workers="1-3", use_gpu=False,  # logical GPUs only
        worker_resources={"trainer": 1}, elastic_check_s=5, max_failures=3,
        steps=STEPS, batch_size=6, checkpoint_every=4, log_every=4,
        diffusion={"vae": "s3://runs-bucket/models/small", "latent_cache": "s3://runs-bucket/latents"},
    )  # fmt: skip
    cfg["data"] = {"root": str(data)}  # no held-out split: checkpoints stay quick
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    env |= local_folders(tmp_path)
    argv = [*ctfactory_bin(), "train", "diffusion", "--config", str(tmp_path / "train.yaml")]
    run = driver(argv, env, tmp_path / "work", tmp_path / "driver")
    run_url, options = "s3://runs-bucket/elastic/diffusion", s3["options"]

    def sizes() -> list[int]:
        """World sizes of the checkpoints so far, by step."""
        return [m["world_size"] for m, _ in reversed(checkpoint_metas(run_url, options))]

    try:
        wait_until(lambda: 3 in sizes(), 300, "a checkpoint on 3 workers", sizes, run)
        cluster.remove_node(workers.pop(), allow_graceful=False)
        wait_until(lambda: 2 in sizes(), 300, "a checkpoint on 2 workers", sizes, run)
        workers.append(cluster.add_node(**NODE))
        regrown = lambda: 3 in sizes()[sizes().index(2) :]  # noqa: E731
        wait_until(regrown, 300, "3 workers again", sizes, run)
    except BaseException:
        run.kill()
        raise
    out, err = finished(run, 300)
    assert run.returncode == 0, out + err
    final = latest_checkpoint(run_url, options)
    history = final["history"]
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert {r["global_batch"] for r in history} == {6}  # per-worker batch scaled, not the global
    sizes_seen = [r["world_size"] for r in history]
    assert sizes_seen[0] == 3 and 2 in sizes_seen and sizes_seen[-1] == 3, sizes_seen
    assert final["meta"]["restarts"] >= 2
    # Everything went to object storage: the latents, checkpoints and logs; nothing local.
    assert fs.glob("runs-bucket/latents/*/complete.json")
    assert fs.glob("runs-bucket/elastic/diffusion/logs/train-diffusion-*.log")
    assert nothing_local(tmp_path)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    # The model goes to object storage too, and loads back from there as it was exported.
    digest = export_model(run_url, "s3://runs-bucket/models/elastic", storage_options=options)
    loaded = load_checkpoint(
        "s3://runs-bucket/models/elastic", tmp_path / "c", storage_options=options
    )
    assert loaded.hash == digest and loaded.card.extra["world_sizes"] == [2, 3]
