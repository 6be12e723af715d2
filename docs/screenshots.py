"""Retake the screenshots of docs/viewing.md and docs/serving.md in headless Chromium: a small
builtin:demo cohort in `ctfactory view` (the list, a volume, the anatomy overlay, the bone
window), and `ctfactory serve`'s page after Generate (`--serve`; it starts a local Ray).

.venv/bin/python docs/screenshots.py [--serve]
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.browser_helpers: the same browser the tests drive

from factory.pipeline import VolumeWriter, prepare_run  # noqa: E402
from factory.store.cohort import CohortStore  # noqa: E402
from factory.store.reader import open_cohort  # noqa: E402
from tests.browser_helpers import chromium  # noqa: E402

OUT = ROOT / "docs" / "images"
CTFACTORY = str(Path(sys.executable).parent / "ctfactory")
SPEC = {
    "schema_version": 1,
    "cohort": {"id": "docs", "n": 6, "seed": 4},
    "labels": {"Pleural effusion": {"prevalence": 0.5}, "Cardiomegaly": {"count": 2}},
    "reference": "model",
    "prompt": {"style": "report"},
    "model": "builtin:demo",
    "sampler": {"steps": 20, "guidance": 5.0},
}


def demo_cohort(base: Path) -> str:
    """The six-volume cohort above, written without Ray."""
    spec = base / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "output": str(base / "cohort")}, sort_keys=False))
    with prepare_run(str(spec)) as run:  # holds the write lease while it writes
        rows = VolumeWriter(run.url, {}, run.settings, threads=2)(run.todo).to_pylist()
        CohortStore(run.url).write_manifest(rows)
    return run.url


def wait_for(predicate, what: str, timeout_s: float = 300):
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.3)


def viewer_status(driver) -> str:
    """The viewer's status line ("" before the viewer is made)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, ".ct-status")
    return found[0].text if found else ""


def view_shots(url: str, driver) -> None:
    """The cohort browser at an effusion, then its anatomy and the bone window."""
    from selenium.webdriver.common.by import By

    manifest = open_cohort(url).manifest
    shown = manifest["volume_id"][manifest["Pleural effusion"] == 1].iloc[0]

    proc = subprocess.Popen(
        [CTFACTORY, "view", url, "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        base = re.search(r"(http://\S+/)", proc.stdout.readline()).group(1)
        driver.get(f"{base}?volume={shown}")
        wait_for(lambda: "voxels" in viewer_status(driver), "the viewer")
        driver.save_screenshot(str(OUT / "viewing" / "browse.png"))
        driver.find_element(By.CSS_SELECTOR, "button[data-window=mediastinal]").click()
        driver.find_element(By.CSS_SELECTOR, ".ct-anatomy").click()
        wait_for(lambda: viewer_status(driver) == "Anatomy masks shown", "the anatomy")
        driver.find_element(By.ID, "viewer").screenshot(str(OUT / "viewing" / "anatomy.png"))
        driver.find_element(By.CSS_SELECTOR, ".ct-anatomy").click()
        driver.find_element(By.CSS_SELECTOR, "button[data-window=bone]").click()
        driver.find_element(By.ID, "viewer").screenshot(str(OUT / "viewing" / "bone.png"))
    finally:
        proc.terminate()
        proc.wait()


def serve_shot(driver) -> None:
    """The serve page after Generate: the volume in the viewer."""
    from selenium.webdriver.common.by import By

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([CTFACTORY, "serve", "--port", str(port)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
        except OSError:
            return False

    try:
        wait_for(ready, "ctfactory serve", timeout_s=600)
        driver.get(base + "/")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#findings input"), "the page")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Large left pleural effusion. Cardiomegaly.")
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "generate").click()
        status = driver.find_element(By.ID, "status")
        wait_for(lambda: "Done in" in status.text, "Generate", timeout_s=600)
        driver.save_screenshot(str(OUT / "serving" / "page.png"))
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="also retake the serve page")
    args = parser.parse_args()
    (OUT / "viewing").mkdir(parents=True, exist_ok=True)
    driver = chromium()
    driver.set_window_size(1300, 1150)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            view_shots(demo_cohort(Path(tmp)), driver)
        if args.serve:
            driver.set_window_size(1000, 1250)
            serve_shot(driver)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
