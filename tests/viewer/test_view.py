"""``ctfactory view`` over a cohort on S3 (moto), still being written: the filters as plain
functions, the API over real HTTP from the real command, and the page in headless Chromium."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import select
import subprocess
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from factory import vocab
from factory.anatomy import channels_from_labels
from factory.cli import main
from factory.pipeline import VolumeWriter, prepare_run
from factory.store.cohort import CohortStore
from factory.store.layout import CHANNEL_COLOURS
from factory.store.reader import open_cohort
from factory.viewer import STATIC
from factory.viewer.catalog import QueryError, parse_query
from factory.viewer.catalog import select as select_rows
from factory.viz import WINDOWS
from tests.browser_helpers import canvas_pixels, chromium, toggle_anatomy
from tests.conftest import ROOT, ctfactory_bin, moto_s3
from tests.store_helpers import small_model, write_spec

URL = "s3://cohorts/view"
SECRET = "view-s3cret-for-the-server-only"  # moto takes any credentials
EFFUSION = "Pleural effusion"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A 6-volume cohort on S3 with 4 volumes written and committed by a VolumeWriter (no Ray),
    3 of them in the manifest: the 4th is what a running ``generate`` has not listed yet."""
    base = tmp_path_factory.mktemp("view")
    with moto_s3() as s3:
        options = {**s3["options"], "secret": SECRET}
        spec = write_spec(base / "spec.yaml", small_model(base / "model"), n=6, output=URL)
        with prepare_run(str(spec), storage_options=options) as run:
            writer = VolumeWriter(run.url, options, run.settings, threads=2)
            rows = writer(run.todo.slice(0, 4)).to_pylist()
        CohortStore(URL, options).write_manifest(rows[:3])
        yield {"s3": s3, "options": options, "rows": rows}


def storage_args(options: dict) -> list[str]:
    """The command-line storage options of ``options``, botocore's own retries off (a store
    that is down fails at once, then the viewer's one retry)."""
    return [
        "--endpoint-url", options["endpoint_url"],
        "--storage-option", f"key={options['key']}",
        "--storage-option", f"secret={options['secret']}",
        "--storage-option", "config_kwargs={retries: {max_attempts: 1}}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server(cohort, tmp_path_factory):
    """``ctfactory view`` on a free port; yields its base URL from the line it prints."""
    command = [*ctfactory_bin(), "view", URL, "--port", "0", *storage_args(cohort["options"])]
    log = open(tmp_path_factory.mktemp("view-log") / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"on (http://127\.0\.0\.1:\d+/) ", line)
        assert found, f"no URL printed: {line!r} {proc.poll()}"
        assert "(3 of 6 volumes committed)" in line, line
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, 4xx and 5xx included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_filters_keep_the_rows_asked_for():
    """select() on a hand-made manifest: every filter, and the refusals naming the filter."""
    columns = {c: [0, 0, 0, 0] for c in vocab.COLUMNS}
    columns[EFFUSION] = [1, 1, 0, 0]
    columns["Cardiomegaly"] = [1, 0, 0, 0]
    manifest = pd.DataFrame(
        {
            "volume_id": ["a", "b", "c", "d"],
            **columns,
            "attributes": [
                json.dumps({"pleural_effusion": {"laterality": "left"}, "cardiomegaly": {}}),
                json.dumps({"pleural_effusion": {"laterality": "right"}}),
                "{}",
                "{}",
            ],
            "age": [70, 45, 30, 81],
            "sex": ["M", "F", "F", "M"],
            "prompt": ["Large LEFT effusion.", "Right effusion.", "Normal.", "Normal scan."],
            "verified": [True, False, None, True],
        }
    )

    def ids(*pairs: tuple[str, str]) -> list[str]:
        return list(select_rows(manifest, parse_query(pairs))["volume_id"])

    assert ids() == ["a", "b", "c", "d"]
    assert ids(("finding", "pleural_effusion")) == ["a", "b"]
    assert ids(("finding", EFFUSION), ("finding", "cardiomegaly")) == ["a"]
    assert ids(("finding", "none")) == ["c", "d"]
    assert ids(("attribute", "laterality=Left")) == ["a"]
    assert ids(("sex", "f")) == ["b", "c"]
    assert ids(("age_min", "45"), ("age_max", "75")) == ["a", "b"]
    assert ids(("prompt", "left eff")) == ["a"]
    assert ids(("verified", "true")) == ["a", "d"] and ids(("verified", "false")) == ["b"]
    assert ids(("finding", ""), ("sex", "")) == ["a", "b", "c", "d"]  # an empty field: no filter
    refused = [
        ([("finding", "pleural efusion")], "finding", "did you mean 'pleural_effusion'"),
        ([("finding", "emphysema"), ("finding", "none")], "finding", "'none' excludes"),
        ([("attribute", "laterality")], "attribute", "expected NAME=VALUE"),
        ([("sex", "X")], "sex", "valid: M, F"),
        ([("age_min", "old")], "age_min", "not a whole number"),
        ([("age_min", "80"), ("age_max", "40")], "age_min", "80 is above age_max 40"),
        ([("limit", "0")], "limit", "outside 1 to 10000"),
        ([("colour", "red")], "colour", "unknown filter; valid: finding, attribute"),
    ]
    for pairs, parameter, message in refused:
        with pytest.raises(QueryError) as caught:
            parse_query(pairs)
        assert caught.value.parameter == parameter and message in str(caught.value), caught.value


def test_the_api_sends_committed_volumes_as_nifti_and_refuses_the_rest(cohort, server):
    options, rows = cohort["options"], cohort["rows"]
    stored = open_cohort(URL, options)
    status, _, body = get(server + "api/volumes")
    listing = json.loads(body)
    assert status == 200 and (listing["planned"], listing["committed"]) == (6, 3)
    assert [v["volume_id"] for v in listing["volumes"]] == [r["volume_id"] for r in rows[:3]]
    first = rows[0]["volume_id"]
    # The volume as NIfTI: int16 HU with the real affine, the very voxels of the store.
    volume = stored.volume(first)
    status, headers, body = get(f"{server}api/volumes/{first}/ct.nii.gz")
    assert status == 200 and headers["content-type"] == "application/gzip"
    image = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    assert image.get_data_dtype() == np.int16
    assert np.allclose(image.get_sform(), volume.affine)
    assert np.allclose(image.get_qform(), volume.affine)
    assert np.array_equal(np.asarray(image.dataobj), volume.hu)
    # The masks as one label map and its legend: every channel comes back voxel for voxel.
    status, headers, body = get(f"{server}api/volumes/{first}/anatomy.nii.gz")
    legend = {int(k): v for k, v in json.loads(headers["x-anatomy-legend"]).items()}
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(body)).dataobj)
    assert status == 200 and labels.dtype == np.uint8 and set(legend.values()) >= set(volume.masks)
    masks = channels_from_labels(labels, legend, list(volume.masks))
    assert all(np.array_equal(m, volume.masks[c]) for m, c in zip(masks, volume.masks, strict=True))
    status, _, body = get(f"{server}api/volumes/{first}")
    record = json.loads(body)
    assert status == 200 and record["prompt"] == rows[0]["prompt"]
    assert record["findings"] == [c for c in vocab.COLUMNS if rows[0][c]]
    # Written and marked but not yet in the manifest (generate still running): not shown.
    late = rows[3]["volume_id"]
    status, _, body = get(f"{server}api/volumes/{late}/ct.nii.gz")
    error = json.loads(body)
    assert status == 404 and error["field"] == "volume_id"
    assert error["error"].startswith(f"{late}: not a committed volume of {URL} (3 committed: ")
    CohortStore(URL, options).write_manifest(rows[3:])  # generate lists it: now it is
    assert get(f"{server}api/volumes/{late}")[0] == 200
    listing = json.loads(get(server + "api/volumes")[2])
    assert listing["committed"] == 4 and listing["volumes"][-1]["volume_id"] == late
    # Bad input: a 4xx naming what is wrong, as JSON.
    for path, code, field, message in [
        ("api/volumes?finding=emfysema", 422, "finding", "did you mean 'emphysema'"),
        ("api/volumes?age_max=young", 422, "age_max", "not a whole number"),
        ("api/volumes/t_9999999", 404, "volume_id", "not a committed volume"),
        ("api/nothing", 404, None, "Not Found"),
    ]:
        status, _, body = get(server + path)
        error = json.loads(body)
        assert (status, error["field"]) == (code, field) and message in error["error"], error
    # Only requests addressed to this machine are answered (no DNS rebinding to it).
    status, _, body = get(server + "api/cohort", {"Host": "attacker.example"})
    assert status == 400 and "attacker.example" in json.loads(body)["error"]
    # The credentials stay on the server.
    for path in ("", "api/cohort", "api/volumes", f"api/volumes/{first}"):
        assert SECRET.encode() not in get(server + path)[2]


def test_bad_input_is_one_line_and_exit_2_before_serving(cohort, tmp_path, capsys):
    storage = storage_args(cohort["options"])
    for command, message in [
        ([str(tmp_path)], f"{tmp_path}: no cohort here (no zarr.json at the root)"),
        ([URL, "--volume", "t_9", *storage], f"--volume t_9: not a committed volume of {URL} ("),
        ([URL, "--port", "70000", *storage], "--port 70000: not a port; valid: 0"),
    ]:
        assert main(["view", *command]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_niivue_is_the_pinned_release_shipped_with_its_licences():
    """One vendored file, the Makefile's NIIVUE_VERSION, its recorded sha256 and licences; the
    pages load nothing from elsewhere."""
    bundle = (STATIC / "niivue.umd.js").read_bytes()
    version = re.search(r"^NIIVUE_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert version and f'version:"{version.group(1)}"'.encode() in bundle
    recorded = (STATIC / "niivue.umd.js.sha256").read_text().split()
    assert recorded == [hashlib.sha256(bundle).hexdigest(), "niivue.umd.js"]
    assert (STATIC / "LICENSE.niivue").read_text().startswith("BSD 2-Clause License")
    notice = (STATIC / "NOTICE.niivue").read_text()
    assert f"NiiVue {version.group(1)}" in notice and "==== gl-matrix" in notice
    assert len(bundle) < 4 * 2**20
    pages = [ROOT / "factory/viewer/page/index.html", ROOT / "serve/static/index.html"]
    for page in pages:
        sources = re.findall(r'(?:src|href)="([^"]*)"', page.read_text())
        assert sources and all(s.startswith(("/", "#", "?", "data:")) for s in sources), sources


def severe(driver, allowed: tuple[str, ...] = ()) -> list[dict]:
    """The console's errors, less the failed requests named in ``allowed`` (status codes)."""
    return [
        e
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and not any(f"status of {code}" in e["message"] for code in allowed)
    ]


def test_the_page_in_headless_chromium(cohort, server):
    """One browser session: a volume opens in the viewer (non-blank, a key moves the slice,
    the window presets and the mask overlay change what is shown), a filter narrows the list,
    an unknown id and an unreachable store are said in the page, and nothing loads from
    elsewhere."""
    from moto.server import ThreadedMotoServer
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    manifest = open_cohort(URL, cohort["options"]).manifest
    first = manifest["volume_id"][0]
    driver = chromium()
    driver.set_window_size(1400, 1100)
    wait = WebDriverWait(driver, 120)

    def text(selector: str) -> str:
        return driver.find_element(By.CSS_SELECTOR, selector).text

    def listed() -> list[str]:
        rows = "document.querySelectorAll('#volumes tbody tr')"
        return driver.execute_script(f"return [...{rows}].map(r => r.dataset.volumeId)")

    try:
        driver.get(f"{server}?volume={first}")
        wait.until(lambda d: "voxels" in text(".ct-status"))  # NiiVue has the volume
        assert driver.execute_script("return CtViewer.supported()")
        shown = canvas_pixels(driver)
        lit = (shown.max(axis=2) > 20).mean()
        assert lit > 0.2 and shown.std() > 20, (lit, shown.std())  # three views of a volume
        assert text("#title") == first and manifest["prompt"][0] in text("#record")
        assert listed() == list(manifest["volume_id"])
        # The presets are factory/viz.py's windows; the anatomy colours the store's.
        windows = driver.execute_script("return CtViewer.WINDOWS")
        assert {k: tuple(windows[k]) for k in WINDOWS} == WINDOWS
        assert driver.execute_script("return CtViewer.CHANNEL_COLOURS") == [
            list(c) for c in CHANNEL_COLOURS
        ]
        # A key moves the axial slice: the position shown and the pixels change.
        before = text(".ct-location")
        slice_before = int(re.search(r"axial slice (\d+)", before).group(1))
        driver.execute_script("document.querySelector('.ct-viewer canvas').focus()")
        driver.switch_to.active_element.send_keys(Keys.ARROW_UP)
        wait.until(lambda d: text(".ct-location") != before)
        assert f"axial slice {slice_before + 1}" in text(".ct-location")
        moved = canvas_pixels(driver)
        assert not np.array_equal(moved, shown)
        driver.find_element(By.CSS_SELECTOR, "button[data-window=bone]").click()
        boned = canvas_pixels(driver)
        assert not np.array_equal(boned, moved)
        toggle_anatomy(driver, wait, boned)
        # A filter narrows the list to the volumes with the finding.
        effusions = list(manifest["volume_id"][manifest[EFFUSION] == 1])
        assert 0 < len(effusions) < len(manifest)
        Select(driver.find_element(By.ID, "finding")).select_by_value("pleural_effusion")
        wait.until(lambda d: listed() == effusions)
        assert text("#count").startswith(f"{len(effusions)} of {len(manifest)} committed")
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(r.startswith(server) for r in resources), resources
        assert not severe(driver)
        # An unknown id: said in the page, and no viewer.
        driver.get(f"{server}?volume=t_9999999")
        wait.until(lambda d: "404" in text("#status"))
        assert "t_9999999: not a committed volume" in text("#status")
        assert not driver.find_element(By.ID, "shown").is_displayed()
        # The store goes away while browsing: said in the page; back, the list is back.
        s3 = cohort["s3"]
        s3["server"].stop()
        try:
            driver.find_element(By.ID, "refresh").click()
            wait.until(lambda d: "503" in text("#count"))
            assert f"{URL}: reading the manifest: failed after 2 attempts" in text("#count")
            assert listed() == []
        finally:
            s3["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=s3["port"])
            s3["server"].start()
        driver.find_element(By.ID, "refresh").click()
        wait.until(lambda d: listed() == list(manifest["volume_id"]))
        assert not severe(driver, allowed=("404", "503"))
    finally:
        driver.quit()
