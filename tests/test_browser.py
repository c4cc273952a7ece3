"""The web app in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright) uploads a real patient through the page of a running `tumorseg serve` app,
waits for the result and checks that the viewer shows the image and the mask, the
quality flag's banner, and the uncertainty overlay when it is switched on.

Needs Playwright and a Chromium: `$TUMORSEG_CHROMIUM`, else `chromium` or
`chromium-browser` on the PATH; skipped without them, failed in CI (TUMORSEG_REQUIRE_DATA=1).
With `$TUMORSEG_SCREENSHOT=PATH` it also writes the page's screenshot there (the README's).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import _missing
from PIL import Image

# WebGL2 in headless Chromium without a GPU: SwiftShader, which newer Chromium enables
# only when asked.
WEBGL_FLAGS = ["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist"]
PATIENT = "TCGA_DU_5853_19950823"  # a fold-0 patient, 7 tumour slices


def chromium() -> str:
    found = os.environ.get("TUMORSEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        _missing("no Chromium found: install Debian's chromium (apt-get install chromium) or set TUMORSEG_CHROMIUM")
    return found


def settle(look, good, seconds: float = 20.0):
    """`look()` until `good` holds of what it saw, or `seconds` pass; the last look."""
    deadline = time.monotonic() + seconds
    while True:
        time.sleep(0.3)
        seen = look()
        if good(seen) or time.monotonic() > deadline:
            return seen


# A rule that flags every result, so that the page's banner is seen whatever this patient
# scores (the shipped rule's own behaviour is tested in test_qc.py).
FLAG_ALL = "review everything (test rule)"


@pytest.fixture
def server(tmp_path):
    """`tumorseg serve`'s app with the shipped model and a rule that flags every result,
    on a free port of 127.0.0.1."""
    import uvicorn

    from tumorseg.config import ServeConfig
    from tumorseg.inference import Predictor
    from tumorseg.qc import Condition, QCRule
    from tumorseg.serve.app import create_app

    predictor = Predictor.from_checkpoints()  # first: it measures engines, which takes a while
    predictor.qc_rule = QCRule((Condition("mean_prob", "<", 2.0),), notes=FLAG_ALL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(predictor, ServeConfig(port=port), tmp_path / "jobs")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    assert list((tmp_path / "jobs").iterdir()) == [], "shutdown must remove the jobs' files"


def red_pixels(png: bytes) -> tuple[int, float]:
    """(pixels where red clearly dominates, the standard deviation of the grey levels)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 60
    return int(red.sum()), float(rgb.mean(-1).std())


def blue_pixels(png: bytes) -> int:
    """Pixels where blue clearly dominates (the uncertainty overlay)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 2] - np.maximum(rgb[..., 0], rgb[..., 1])) > 60).sum())


def test_a_patient_uploaded_through_the_page_is_shown_with_its_mask(server, real_data, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    executable = chromium()
    archive = tmp_path / f"{PATIENT}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((real_data / PATIENT).iterdir()):
            zf.write(f, arcname=f"{PATIENT}/{f.name}")

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=WEBGL_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            assert page.get_attribute("body", "data-state") == "idle"
            page.set_input_files("#files", str(archive))
            page.click("#submit")
            page.wait_for_function("['shown', 'error'].includes(document.body.dataset.state)", timeout=180_000)
            state = page.get_attribute("body", "data-state")
            assert state == "shown", page.inner_text("#status")
            assert errors == []
            assert page.inner_text("#tumour-slices").startswith("7 of 36")
            assert page.is_visible("#dice-row") and 0.5 < float(page.inner_text("#dice")) <= 1.0
            assert page.get_attribute("#download", "download") == f"{PATIENT}_masks.zip"
            # The quality flag: a visible banner with the reason.
            assert page.get_attribute("body", "data-qc") == "review"
            assert page.is_visible("#qc-banner")
            assert page.inner_text("#qc-banner").startswith("Review this result: ")
            assert "mean probability" in page.inner_text("#qc-banner")
            # Software WebGL draws late on a busy machine: look again until the frame shows it.
            red, spread = settle(lambda: red_pixels(page.locator("#viewer").screenshot()),
                                 lambda v: v[1] > 10 and v[0] > 50)
            assert spread > 10, "the viewer shows a blank canvas"
            assert red > 50, f"no mask colour on the tumour slice ({red} red pixels)"
            page.uncheck("#show-mask")
            hidden, _ = settle(lambda: red_pixels(page.locator("#viewer").screenshot()), lambda v: v[0] < red / 5)
            assert hidden < red / 5, "unchecking the mask does not hide it"
            page.check("#show-mask")
            # The uncertainty overlay is off until switched on, then drawn in blue.
            assert page.is_visible("#uncertain-control") and not page.is_checked("#show-uncertain")
            before = blue_pixels(page.locator("#viewer").screenshot())
            page.check("#show-uncertain")
            after = settle(lambda: blue_pixels(page.locator("#viewer").screenshot()), lambda b: b > before + 20)
            assert after > before + 20, f"switching on the uncertain voxels shows no blue ({before} -> {after})"
            page.uncheck("#show-uncertain")
            page.wait_for_timeout(300)
            if os.environ.get("TUMORSEG_SCREENSHOT"):
                page.screenshot(path=os.environ["TUMORSEG_SCREENSHOT"])
        finally:
            browser.close()
    if os.environ.get("TUMORSEG_SCREENSHOT"):
        assert Path(os.environ["TUMORSEG_SCREENSHOT"]).stat().st_size > 10_000
