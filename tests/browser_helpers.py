"""Headless Debian Chromium through its ChromeDriver (installed by `make browser`), shared by the
web page, cohort viewer and QC report tests."""

from __future__ import annotations

import os
from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def chromium():
    """A headless Chromium WebDriver that keeps the browser console log (quit it when done)."""
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the browser tests need Debian's chromium and chromium-driver: "
        "apt-get install chromium chromium-driver (make browser)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # WebGL2 (the NiiVue viewer) on SwiftShader, the software renderer: the pages are ours.
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
        "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def canvas_pixels(driver, selector: str = ".ct-viewer canvas"):
    """What a canvas shows now (the 3D viewer's by default), as an RGB numpy array."""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    png = driver.find_element(By.CSS_SELECTOR, selector).screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def toggle_anatomy(driver, wait, under) -> None:
    """Switch the viewer's anatomy overlay on (coloured labels and their legend appear over the
    picture ``under``), then off (``under`` comes back)."""
    import numpy as np
    from selenium.webdriver.common.by import By

    def status() -> str:
        return driver.find_element(By.CSS_SELECTOR, ".ct-status").text

    toggle = driver.find_element(By.CSS_SELECTOR, ".ct-anatomy")
    toggle.click()
    wait.until(lambda d: status() == "Anatomy masks shown")
    overlaid = canvas_pixels(driver)
    assert not np.array_equal(overlaid, under)
    assert np.ptp(overlaid.astype(int), axis=2).max() > 60  # coloured, not grey
    assert "lungs" in driver.find_element(By.CSS_SELECTOR, ".ct-legend").text
    toggle.click()
    wait.until(lambda d: status() == "Anatomy masks hidden")
    assert np.array_equal(canvas_pixels(driver), under)


# Run before a page's scripts: the page sees a browser without WebGL2.
NO_WEBGL2 = """const getContext = HTMLCanvasElement.prototype.getContext;
HTMLCanvasElement.prototype.getContext = function (kind, ...rest) {
  return kind === "webgl2" ? null : getContext.call(this, kind, ...rest);
};"""
