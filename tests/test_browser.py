"""End to end in headless Chromium (issue 9, item 6): open the page, generate, run a 2×2 compare, start and stop
a tiny training run; screenshots go to docs/screenshots/.

Debian's ``chromium`` package driven by the PyPI ``playwright`` package through ``executable_path`` (playwright's
own browser download cannot work offline). ``.ci/run`` installs chromium; without it this test skips.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

import app

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and os.access(p, os.X_OK)), None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; "
                                                         ".ci/run does it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    ui = app.make_app([], runs_dir=runs)
    port = free_port()
    app.launch(ui, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", runs
    ui.close()


@pytest.fixture(scope="module")
def page(served):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served[0])
        page.get_by_text("Diffusion workbench").first.wait_for()
        yield page
        browser.close()


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True).first
    box.fill(str(value))
    box.press("Enter")


def test_generate(page):
    model = page.get_by_label("model", exact=True).first
    model.click()
    page.get_by_role("option", name="mnist-exact").click()
    page.get_by_text("exact-gmm").first.wait_for()  # the model's description updated
    set_number(page, "number input for steps", 10)
    set_number(page, "number input for batch size", 8)
    page.locator("#generate-run").click()
    info = page.locator("#generate-info")
    info.get_by_text("NFE 10 per image").wait_for()  # 10 steps at the default guidance 1: one call a step
    assert "seed 0" in info.inner_text()
    assert page.locator("img[src*='.png']").count() >= 8
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "generate.png", full_page=True)


def test_compare_two_by_two(page):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-run").click()  # defaults: X sampler (ddim, dpmpp-2m) × Y steps (5, 20)
    page.locator("#compare-files").get_by_text(".csv", exact=True).wait_for()  # written after the last cell
    page.locator("#compare-grid img").wait_for()
    text = page.locator("#compare-table").inner_text()
    assert text.count("dpmpp-2m") == 2 and text.count("ddim") == 2  # 2 × 2 cells
    page.screenshot(path=SCREENSHOTS / "compare.png", full_page=True)


def test_start_and_stop_a_training_run(page, served):
    runs = served[1]
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-name textarea, #train-name input").first.fill("browser-run")
    for element, value in (("#train-steps", 500), ("#train-batch", 4), ("#train-max-images", 32)):
        page.locator(f"{element} input").fill(str(value))
    page.locator("#train-start").click()
    page.locator("#train-command").get_by_text("train.diffusion").first.wait_for()
    page.locator("#train-status").get_by_text("running").wait_for()
    metrics = runs / "browser-run" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while (not metrics.exists() or not metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert json.loads(metrics.read_text().splitlines()[0])["step"] == 1
    time.sleep(2.5)  # one poll of the page: the loss curve draws
    page.screenshot(path=SCREENSHOTS / "train.png", full_page=True)
    page.locator("#train-stop").click()
    page.locator("#train-status").get_by_text("stopped").wait_for()
    record = json.loads((runs / "browser-run" / "ui_run.json").read_text())
    assert "--max-train-images" in record["argv"] and record["module"] == "train.diffusion"
    page.get_by_role("tab", name="Evaluate").click()
    page.screenshot(path=SCREENSHOTS / "evaluate.png", full_page=True)
