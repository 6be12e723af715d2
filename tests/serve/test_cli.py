"""``ctfactory serve`` as users run it: builtin:demo on 127.0.0.1, an API key, a NIfTI back."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import yaml

from factory.models.generator import Generator
from tests.conftest import ROOT, ctfactory_bin
from tests.serve.test_ray import free_port


def test_bad_serve_config_exits_2(run_cli, tmp_path):
    bad = tmp_path / "serve.yaml"
    app = "  - import_path: serve.app:build_app\n    args:\n      limits: {max_steps: 0}\n"
    bad.write_text("applications:\n" + app)
    proc = run_cli("serve", "--config", str(bad))
    assert proc.returncode == 2
    assert "limits.max_steps" in proc.stderr and "greater than or equal to 1" in proc.stderr
    proc = run_cli("serve", "--model", "broken")
    assert proc.returncode == 2 and "--model 'broken': expected ID=REF" in proc.stderr


def test_ctfactory_serve_returns_a_valid_nifti_of_builtin_demo(cluster, tmp_path):
    import ray
    from ray import serve

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    config["applications"][0]["args"]["cpus_per_replica"] = 1  # the test cluster is shared
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": cluster, "CTFACTORY_API_KEY": "k-123"}
    command = [
        *ctfactory_bin(),
        "serve",
        "--port",
        str(port),
        "--config",
        str(tmp_path / "serve.yaml"),
    ]
    output = open(os.devnull, "w")  # noqa: SIM115 (closed with the process below)
    # A shell's background job (`make test &`, nohup) starts with SIGINT ignored and its
    # children inherit that; Ctrl-C is what this test sends, so the server gets the default.
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=output,
        stderr=output,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"ctfactory serve exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:  # not listening yet, refused, timed out or 503
                pass
            assert time.monotonic() < deadline, f"never ready; free: {ray.available_resources()}"
            time.sleep(1)
        body = json.dumps({"prompt": "Large bilateral pleural effusion.", "seed": 3, "steps": 4})
        request = urllib.request.Request(base + "/v1/volumes", data=body.encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        try:
            urllib.request.urlopen(request, timeout=120)
            raise AssertionError("a request without the API key was served")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        request.add_header("X-API-Key", "k-123")
        with urllib.request.urlopen(request, timeout=120) as response:
            data, headers = response.read(), response.headers
        image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
        hu = np.asarray(image.dataobj)
        demo = Generator.load("builtin:demo", device="cpu")
        assert hu.shape == tuple(demo.config.size) and hu.dtype == np.int16
        np.testing.assert_allclose(image.affine, demo.grid.affine())
        assert headers["X-Model-Hash"] == demo.model_hash and headers["X-Seed"] == "3"
        assert -1024 <= hu.min() < hu.max() <= 3071
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        output.close()
        serve.shutdown()  # whatever happened, leave the shared cluster without Serve
    assert proc.returncode == 130  # interrupted: Serve shut down, the CLI's exit code for ^C
