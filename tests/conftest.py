"""Shared test helpers: run the real ``ctfactory`` console script; one local Ray cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ctfactory_bin() -> list[str]:
    exe = shutil.which("ctfactory", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "factory.cli"]


@pytest.fixture
def run_cli():
    """Run ``ctfactory ARGS`` as a subprocess; returns the CompletedProcess."""

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [*ctfactory_bin(), *args], capture_output=True, text=True, env=env, cwd=ROOT
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctfactory {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run


@pytest.fixture(scope="session")
def cluster():
    """A real local Ray cluster for the whole session (4 logical CPUs on 2 cores); returns its
    address, which CLI subprocesses join through RAY_ADDRESS. Store writes retry 4 times
    (about 8 s) in its workers instead of 10, so that a persistent fault fails quickly."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["CTFACTORY_WRITE_RETRIES"] = "4"
    ray.init(num_cpus=4, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 with buckets ``runs-bucket`` and ``cohorts``: yields a dict
    with its ``options`` (s3fs storage options), ``server`` and ``port``. A test may stop the
    server and start another on the same port: moto keeps the objects in this process."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for bucket in ("runs-bucket", "cohorts"):
        fs.makedirs(bucket, exist_ok=True)  # moto keeps buckets across servers
    state = {"server": server, "port": port, "options": options}
    try:
        yield state
    finally:
        state["server"].stop()


@pytest.fixture
def s3():
    """A moto S3 server for one test (see :func:`moto_s3`)."""
    with moto_s3() as state:
        yield state
