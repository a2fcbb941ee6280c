"""The web page in a real browser: headless Chromium uploads a real photo and the page shows the
five names as bars. Needs Debian's chromium (run_tests.sh installs it). Without it the test is
skipped on a developer's machine, and fails in CI (where CI is set), so CI never passes silently.

WEB_APP_SCREENSHOT=assets/web_app.png saves the screenshot there (how the README's was made);
WEB_APP_MODEL=model.onnx serves that model instead of the test's own.
"""
import os
import shutil
from pathlib import Path

import pytest

from app_models import live_server, lite0_checkpoint, photo
from flower_classifier.export import export_onnx
from flower_classifier.serving import create_app, load_predictor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: run_tests.sh installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    model = os.environ.get("WEB_APP_MODEL")
    if not model:
        tmp = tmp_path_factory.mktemp("web")
        model = export_onnx(lite0_checkpoint(tmp / "lite0.pth"), tmp / "lite0.onnx")
    with live_server(create_app(load_predictor(model))) as url:
        yield url


def test_a_person_uploads_a_photo_and_sees_the_top_five_names(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 480, "height": 900}, device_scale_factor=1)
    page.goto(app_url)
    assert page.title() == "Which flower is this?"
    assert page.get_attribute("#camera", "capture") is not None  # phones open the camera
    page.set_input_files("#picker", str(photo("sunflower.jpg")))
    page.wait_for_selector("#results li:nth-child(5)", timeout=30_000)
    names = page.locator("#results .name").all_inner_texts()
    percents = page.locator("#results .pct").all_inner_texts()
    assert len(names) == 5 and names[0].lower() == "sunflower"
    assert "Most likely: sunflower" in page.inner_text("#status")
    values = [float(p.rstrip("%")) for p in percents]
    assert values == sorted(values, reverse=True) and sum(values) <= 100.5
    page.wait_for_function("document.getElementById('preview').complete")  # the photo is shown too
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 224
    shot = Path(os.environ.get("WEB_APP_SCREENSHOT") or tmp_path / "web_app.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_the_page_says_why_a_file_is_refused(browser, app_url, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page = browser.new_page()
    page.goto(app_url)
    page.set_input_files("#picker", str(notes))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "not a readable image" in page.inner_text("#status")
    assert page.locator("#results li").count() == 0


def test_the_look_twice_box_asks_for_test_time_augmentation(browser, app_url):
    page = browser.new_page()
    page.goto(app_url)
    page.wait_for_load_state("networkidle")  # the box takes the server's default from /health
    assert not page.is_checked("#tta")
    for checked in (True, False):
        page.set_checked("#tta", checked)
        with page.expect_response(lambda r: "/predict" in r.url) as answer:
            page.set_input_files("#picker", str(photo("sunflower.jpg")))
        assert answer.value.json()["tta"] is checked and f"tta={str(checked).lower()}" in answer.value.url
        page.wait_for_selector("#results li:nth-child(5)", timeout=30_000)
