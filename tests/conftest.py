"""Shared test helpers: run the real ``ctfactory`` console script."""

from __future__ import annotations

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
