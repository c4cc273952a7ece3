"""How long `tumorseg serve` takes a new user: the server's start (loading the model and,
with an empty measurement cache, timing the engines once), then one patient from the
page's Segment button until the viewer shows it, in headless Chromium.

    python benchmarks/serve_time.py kaggle_3m/TCGA_DU_5853_19950823 [--port 8765] [--json out.json]

Needs the `serve` extra, Playwright and a Chromium (`--chromium`, default `chromium` on the
PATH). Prints a table; the numbers are wall-clock seconds on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patient", type=Path, help="a kaggle_3m patient folder")
    ap.add_argument("--port", default="8765")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--warm", action="store_true", help="keep the user's measurement cache (default: an empty one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="serve-time-"))
    env = dict(os.environ) if a.warm else dict(os.environ, TUMORSEG_CACHE_DIR=str(tmp / "measured"))
    archive = tmp / f"{a.patient.name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(a.patient.iterdir()):
            zf.write(f, arcname=f"{a.patient.name}/{f.name}")
    t0 = time.monotonic()
    proc = subprocess.Popen(["tumorseg", "serve", "--port", a.port], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print("server:", line.rstrip())
            if "open http" in line:
                break
        start = time.monotonic() - t0
        time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=a.chromium,
                                        args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{a.port}/")
            page.set_input_files("#files", str(archive))
            t1 = time.monotonic()
            page.click("#submit")
            page.wait_for_function("['shown', 'error'].includes(document.body.dataset.state)", timeout=600_000)
            job = time.monotonic() - t1
            state = page.get_attribute("body", "data-state")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {"server start (s)": start, "Segment to viewer (s)": job, "total (s)": start + job}
    print(f"\n{'step':<24}{'seconds':>10}")
    for k, v in rows.items():
        print(f"{k.removesuffix(' (s)'):<24}{v:>10.1f}")
    print(f"viewer state: {state}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    if a.json:
        a.json.write_text(json.dumps({"patient": a.patient.name, "state": state, "warm_cache": a.warm,
                                      **{k: round(v, 2) for k, v in rows.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
