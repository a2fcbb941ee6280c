"""The web page in a real browser: headless Chromium uploads a real photo and the page shows the
answer as a heading and the five names as bars (or, for a photo of none of the species, that answer). Needs Debian's chromium (run_tests.sh installs it). Without it the test is
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
def lite0(tmp_path_factory):
    return lite0_checkpoint(tmp_path_factory.mktemp("web") / "lite0.pth")


@pytest.fixture(scope="module")
def app_url(lite0):
    model = os.environ.get("WEB_APP_MODEL") or export_onnx(lite0, lite0.with_suffix(".onnx"))
    with live_server(create_app(load_predictor(model))) as url:
        yield url


@pytest.fixture(scope="module")
def unknown_url(lite0):
    """The same model calibrated so that every photo is none of its species (every score is above -1)."""
    from flower_classifier.calibration import Calibration
    from flower_classifier.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(lite0)
    ckpt.calibration = Calibration(1.0, "msp", -1.0)
    model = export_onnx(save_checkpoint(ckpt, lite0.with_name("all_unknown.pth")), lite0.with_name("all_unknown.onnx"))
    with live_server(create_app(load_predictor(model))) as url:
        yield url


def _shot(page, tmp_path, name: str, env: str | None = None) -> Path:
    shot = Path(os.environ.get(env) if env and os.environ.get(env) else tmp_path / name)
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    return shot


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
    assert page.inner_text("#answer h2").lower() == "sunflower"  # the answer is the heading
    assert page.get_attribute("#answer", "class") == "answer known" and "% likely" in page.inner_text("#answer p")
    values = [float(p.rstrip("%")) for p in percents]
    assert values == sorted(values, reverse=True) and sum(values) <= 100.5
    page.wait_for_function("document.getElementById('preview').complete")  # the photo is shown too
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 224
    _shot(page, tmp_path, "web_app.png", "WEB_APP_SCREENSHOT")


def test_a_photo_of_none_of_the_species_gets_that_as_the_answer(browser, unknown_url, tmp_path):
    page = browser.new_page(viewport={"width": 480, "height": 900}, device_scale_factor=1)
    page.goto(unknown_url)
    page.set_input_files("#picker", str(photo("sunflower.jpg")))
    page.wait_for_selector("#answer.unknown", timeout=30_000)
    assert page.inner_text("#answer h2") == "Not one of the 5 flowers I know"
    assert "is not the answer" in page.inner_text("#answer p")
    assert page.locator("#results li").count() == 0 and page.inner_text("#status") == ""  # no bars, no footnote
    colour = page.eval_on_selector("#answer h2", "e => getComputedStyle(e).color")
    assert colour == "rgb(138, 75, 0)"  # amber, not the grey of a status line nor the green of a species
    size = page.eval_on_selector("#answer h2", "e => parseFloat(getComputedStyle(e).fontSize)")
    assert size > 1.3 * page.eval_on_selector("#status", "e => parseFloat(getComputedStyle(e).fontSize)")
    _shot(page, tmp_path, "web_app_unknown.png", "WEB_APP_UNKNOWN_SCREENSHOT")


def test_a_desktop_gets_one_button_and_a_phone_its_camera_too(browser, app_url):
    page = browser.new_page()
    page.goto(app_url)
    assert page.is_visible("text=Choose a photo") and not page.is_visible("text=Take a photo")
    phone = browser.new_context(has_touch=True, is_mobile=True, viewport={"width": 390, "height": 844})
    page = phone.new_page()
    page.goto(app_url)
    assert page.is_visible("text=Choose a photo") and page.is_visible("text=Take a photo")
    phone.close()


def test_the_page_says_why_a_file_is_refused(browser, app_url, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page = browser.new_page()
    page.goto(app_url)
    page.set_input_files("#picker", str(notes))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "not a readable image" in page.inner_text("#status")
    assert page.locator("#results li").count() == 0
    assert page.is_hidden("#preview") and page.is_hidden("#answer")  # no broken-image icon, no old answer


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
