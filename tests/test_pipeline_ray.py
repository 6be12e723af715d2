"""The factory on a real local Ray cluster: CLI end to end, one vs two actors, S3 (moto) with an
outage, a killed driver, two runs into one cohort, a crashing actor and a persistent write
failure."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import ray
import zarr
from ray import cloudpickle

from factory.pipeline import GenerationError, generate_cohort, load_actor_generator, prepare_run
from factory.store.reader import open_cohort
from tests.conftest import ROOT, ctfactory_bin
from tests.store_helpers import small_model, write_spec

# Actors unpickle this module's loaders by value: they need not import the tests package.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_model(tmp_path_factory.mktemp("model") / "small")


def cli(cluster: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*ctfactory_bin(), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def in_process(capsys, *args: str) -> tuple[int, str]:
    """``ctfactory ARGS`` in this process (status, check, export start no Ray): code, stdout."""
    from factory.cli import main

    code = main(list(args))
    return code, capsys.readouterr().out


def generate(spec: Path, out: str | None = None, opts=None, **kw):
    run = prepare_run(str(spec), out, opts)
    return run, generate_cohort(run, **kw)


def assert_complete(url: str, opts=None) -> None:
    """Every planned volume committed exactly once, and each reads back as recorded."""
    cohort = open_cohort(url, opts)
    manifest = cohort.read_manifest()
    assert manifest["volume_id"].is_unique
    assert sorted(manifest["volume_id"]) == sorted(cohort.plan_ids())
    assert cohort.check() == []
    status = cohort.status()
    assert (status.partial, status.missing, status.uncommitted_markers) == (0, 0, 0)


def test_cli_end_to_end_and_two_actors_match_one(cluster, model, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", model, n=6, output=str(tmp_path / "one"))
    done = cli(cluster, "generate", str(spec), "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "6 of 6 in the cohort" in done.stdout and "report:" in done.stdout
    assert "Pleural effusion" in done.stdout  # requested vs planned vs stored per finding
    one = tmp_path / "one"
    assert (one / "report" / "montage.png").read_bytes()[:4] == b"\x89PNG"
    assert_complete(str(one))

    # The console holds ct-factory's progress, plain warnings and the summary; Ray's, Ray
    # Data's and the actors' library lines are in the run's log, which the summary names.
    for noise in ("INFO", "core_worker", "Loading weights", "PromptTruncated"):
        assert noise not in done.stderr, noise
    logs = list((one / "logs").glob("generate-*.log"))
    assert len(logs) == 1 and f"log: {logs[0]}" in done.stdout
    assert "streaming_executor" in logs[0].read_text()
    # Prompts over the small model's 64 tokens, counted here with the tokenizer itself.
    from transformers import AutoTokenizer

    from factory.models.negation import conditioning
    from factory.models.text import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    prompts = open_cohort(str(one)).manifest["prompt"]
    cut = sum(len(tokenizer(conditioning(p, "guide").affirmed)["input_ids"]) > 64 for p in prompts)
    assert cut > 0
    warning = f"warning: {cut} of 6 prompts were longer than the text encoder's 64 tokens"
    assert warning in done.stdout

    # Independent readers: zarr-python on the documented paths, and the exported NIfTI.
    cohort = open_cohort(str(one))
    first = cohort.manifest.iloc[0]
    image = zarr.open_group(str(one / "volumes" / first["volume_id"]), mode="r")["hu"]
    assert image.shape == (32, 32, 32) and image.dtype == np.int16
    code, out = in_process(capsys, "status", str(one))
    assert code == 0 and out.startswith("planned 6 | done 6 | partial 0")
    code, out = in_process(capsys, "check", str(one))
    assert code == 0 and "checked 6 volumes: ok" in out
    code, out = in_process(capsys, "export", str(one), "--nifti", str(tmp_path / "nii"))
    assert code == 0 and "exported 6 volumes" in out
    nifti = nib.load(tmp_path / "nii" / "train" / "train_1_a_1.nii.gz")
    assert np.array_equal(np.asarray(nifti.dataobj), image[...])

    # A Ray Dataset of the cohort, for training on it.
    rows = cohort.ray_dataset().take_all()
    assert sorted(r["volume_id"] for r in rows) == sorted(cohort.manifest["volume_id"])
    assert np.array_equal(np.asarray(rows[0]["hu"]), cohort.volume(rows[0]["volume_id"]).hu)

    # Re-running the finished cohort generates nothing.
    again = cli(cluster, "generate", str(spec))
    assert (
        again.returncode == 0 and "6 already in" in again.stdout and "0 to generate" in again.stdout
    )

    # Two actors, other batches: the same bytes per volume id.
    _run, totals = generate(spec, out=str(tmp_path / "two"), workers=2, batch_size=1)
    assert totals.written == 6
    two = open_cohort(str(tmp_path / "two")).read_manifest().set_index("volume_id")
    ones = cohort.manifest.set_index("volume_id")
    for column in ("hu_sha256", "anatomy_sha256", "prompt", "seed"):
        assert two[column].sort_index().equals(ones[column].sort_index()), column


def _outage(state: dict, seconds: float, log: dict) -> None:
    """Take the S3 endpoint down for ``seconds`` once the first volume is committed."""
    import s3fs

    fs = s3fs.S3FileSystem(**state["options"], skip_instance_cache=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if fs.ls("cohorts/c/committed", refresh=True):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    log["committed_before"] = len(fs.ls("cohorts/c/committed", refresh=True))
    state["server"].stop()
    time.sleep(seconds)
    from moto.server import ThreadedMotoServer

    state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=state["port"])
    state["server"].start()


def test_s3_cohort_from_the_cli_survives_an_endpoint_outage(cluster, model, tmp_path, s3, capsys):
    spec = write_spec(tmp_path / "spec.yaml", model, n=8, output="s3://cohorts/c")
    log: dict = {}
    outage = threading.Thread(target=_outage, args=(s3, 3.0, log))
    outage.start()
    options = s3["options"]
    flags = ["--endpoint-url", options["endpoint_url"]]
    flags += ["--storage-option", "key=testing", "--storage-option", "secret=testing"]
    done = cli(cluster, "generate", str(spec), "--batch-size", "1", *flags)
    outage.join()
    assert done.returncode == 0, done.stderr
    assert 1 <= log["committed_before"] < 8, "the outage did not happen mid-run"
    assert "8 of 8 in the cohort" in done.stdout
    assert_complete("s3://cohorts/c", options)
    from factory.cli import main

    # the deprecated spelling still checks, and says what to type instead
    code = main(["verify", "s3://cohorts/c", *flags])
    printed = capsys.readouterr()
    assert code == 0 and "checked 8 volumes: ok" in printed.out
    assert "deprecated, use `ctfactory check`" in printed.err
    # Read back through zarr on s3fs directly, and through the reader's dataset.
    cohort = open_cohort("s3://cohorts/c", options)
    vid = cohort.manifest["volume_id"].iloc[3]
    store = zarr.storage.FsspecStore.from_url("s3://cohorts/c", storage_options=options)
    hu = zarr.open_group(store, mode="r", zarr_format=3)[f"volumes/{vid}/hu"][...]
    assert np.array_equal(hu, cohort.dataset()[3]["hu"])


def test_killed_driver_then_rerun_commits_every_volume_once(cluster, model, tmp_path):
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", model, n=10, output=str(out))
    env = {**os.environ, "RAY_ADDRESS": cluster}
    proc = subprocess.Popen(
        [*ctfactory_bin(), "generate", str(spec), "--batch-size", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    rng = np.random.default_rng()
    target = int(rng.integers(1, 5))  # a random point: after 1 to 4 committed volumes
    while time.time() < deadline and len(list((out / "committed").glob("*.json"))) < target:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list((out / "committed").glob("*.json")))
    assert 1 <= committed < 10
    run, totals = generate(spec, batch_size=2)
    assert run.state == "resumed" and run.done_before >= committed - 2
    assert totals.written <= 10 - run.done_before
    assert_complete(str(out))


def test_two_runs_into_one_cohort_at_once_one_writes_and_each_volume_has_one_row(
    cluster, model, tmp_path
):
    """Two ``generate`` processes started together into one new output: one takes the write
    lease, the other refuses at once naming it; any Parquet reader of manifest/ then sees one
    row per committed volume."""
    import pyarrow.dataset

    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", model, n=4, output=str(out))
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONUNBUFFERED": "1"}
    command = [*ctfactory_bin(), "generate", str(spec), "--batch-size", "1"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=ROOT)
        for _ in range(2)
    ]  # fmt: skip
    ended = {p.pid: (p.wait(), *p.communicate()) for p in procs}
    codes = sorted(code for code, _, _ in ended.values())
    assert codes == [0, 2], ended
    (winner,) = [pid for pid, (code, _, _) in ended.items() if code == 0]
    (refused,) = [err for code, _, err in ended.values() if code == 2]
    assert refused.strip().count("\n") == 0 and "Traceback" not in refused
    assert "another run is writing this cohort" in refused
    assert f"process {winner}, started " in refused, refused
    rows = pyarrow.dataset.dataset(out / "manifest", format="parquet").to_table()
    ids = rows.column("volume_id").to_pylist()
    assert sorted(ids) == sorted(open_cohort(str(out)).plan_ids())  # once each
    assert_complete(str(out))


class CrashingGenerator:
    """The real generator, except that the actor process dies on one seed, once."""

    def __init__(self, inner, seed: int, flag: str):
        self.inner, self.seed, self.flag = inner, seed, flag
        self.model_hash = inner.model_hash

    def generate(self, requests, batch_size):
        if any(r.seed == self.seed for r in requests) and not os.path.exists(self.flag):
            Path(self.flag).touch()
            os._exit(1)
        return self.inner.generate(requests, batch_size)


def crashing_loader(ref, storage_options, seed, flag):
    return CrashingGenerator(load_actor_generator(ref, storage_options), seed, flag)


def test_an_actor_crash_is_retried_and_the_run_completes(cluster, model, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", model, n=6, output=str(tmp_path / "out"))
    run = prepare_run(str(spec))
    seed = run.todo.column("seed")[3].as_py()
    flag = str(tmp_path / "crashed")
    loader = functools.partial(crashing_loader, seed=seed, flag=flag)
    totals = generate_cohort(run, workers=1, batch_size=1, loader=loader)
    assert os.path.exists(flag), "the actor never crashed"
    assert totals.written == 6
    assert_complete(str(tmp_path / "out"))


class CrashWhileWriting:
    """The real generator, except that the actor dies as it starts sampling the first batch
    after the one with seed ``seed``: that batch is sampled and held by its call, not yet
    written (its volume's folder, ``blocked``, refuses writes, so the call is retrying). The
    folder is made writable, and whether the volume had a marker is noted, just before."""

    def __init__(self, inner, seed: int, blocked: str, marker: str, flag: str):
        self.inner, self.seed, self.blocked, self.marker, self.flag = (
            inner,
            seed,
            blocked,
            marker,
            flag,
        )
        self.model_hash = inner.model_hash
        self.armed = False

    def generate(self, requests, batch_size):
        if self.armed and not os.path.exists(self.flag):
            Path(self.flag).write_text(str(os.path.exists(self.marker)))
            os.unlink(self.blocked)
            os._exit(1)
        volumes = self.inner.generate(requests, batch_size)
        self.armed = self.armed or any(r.seed == self.seed for r in requests)
        return volumes


def crash_while_writing_loader(ref, storage_options, **kw):
    return CrashWhileWriting(load_actor_generator(ref, storage_options), **kw)


def test_an_actor_killed_with_sampled_unwritten_volumes_loses_only_those(cluster, model, tmp_path):
    """Sampling overlaps writing (two calls in flight per actor): a kill inside that window
    loses the volumes not yet committed, and the retried task writes each of them once."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", model, n=6, output=str(out))
    run = prepare_run(str(spec))
    held = run.todo.slice(1, 1).to_pylist()[0]
    blocked = out / "volumes" / held["volume_id"]
    blocked.symlink_to("/proc/self")  # read-only: the write retries, the volume stays in memory
    flag = tmp_path / "crashed"
    loader = functools.partial(
        crash_while_writing_loader, seed=held["seed"], blocked=str(blocked),
        marker=str(out / "committed" / f"{held['volume_id']}.json"), flag=str(flag),
    )  # fmt: skip
    totals = generate_cohort(run, workers=1, batch_size=1, loader=loader, in_flight=2)
    assert flag.exists(), "the actor never crashed"
    assert flag.read_text() == "False"  # the held volume was sampled, not committed, when killed
    assert totals.written == 6
    assert_complete(str(out))


def test_a_persistent_write_failure_names_the_volume_and_keeps_the_rest(cluster, model, tmp_path):
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", model, n=5, output=str(out))
    run = prepare_run(str(spec))
    bad = run.todo.column("volume_id")[2].as_py()
    (out / "volumes" / bad).symlink_to("/proc/self")  # read-only, even for root
    with pytest.raises(
        GenerationError, match=f"volume {bad}: writing its arrays: failed after 5 attempts"
    ):
        generate_cohort(run, workers=1, batch_size=1)
    cohort = open_cohort(str(out))
    assert bad not in set(cohort.read_manifest()["volume_id"])
    assert cohort.check() == []  # what was committed is intact
    (out / "volumes" / bad).unlink()
    rerun, _totals = generate(spec)
    assert bad in set(rerun.todo.column("volume_id").to_pylist())
    assert_complete(str(out))
    assert ray.is_initialized()
