"""benchmarks/gpu.py, the one script a lent GPU runs, on its CPU path: it says there is no
CUDA and still fills every table with measured numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_without_cuda_it_says_so_and_measures_the_cpu_path(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert out.startswith("no CUDA here: the CPU path at tiny sizes")
    rows = re.findall(r"^\| tiny \| 64x64x64 \| (\d+) \| ([\d.]+) \| - \(CPU\) \|$", out, re.M)
    assert [b for b, _ in rows] == ["1", "2"] and all(float(s) > 0 for _, s in rows)
    assert re.search(
        r"^\| ctfactory generate, 1 worker\(s\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out, re.M
    )
    assert re.search(r"^batching speed-up: [\d.]+x$", out, re.M)
    assert "(exit" not in out
