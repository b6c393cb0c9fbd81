"""The explorer page in a real browser (headless Chromium from the system packages, Selenium) against the
real service process: the page loads without console errors, samples change with the seed, an uploaded
digit and a drawing get their reconstruction and p-value (the same numbers the API gives), interpolation
and traversals render, and an API key typed in opens a protected service whose errors the page shows.

Skipped, with the reason, only where no browser can be installed (scripts/install_browser.sh, run by
`make test`, installs it where the machine allows).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import browser
import harness
import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(browser.missing_reason() is not None, reason=browser.missing_reason() or "")

KEY = "explorer-test-key-0123456789"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Server]:
    log = tmp_path_factory.mktemp("explorer") / "service.log"
    with harness.start_server(models_dir, log, env={"VAE_HTTP_WORKERS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    driver = browser.start_chrome()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def digit_files(artifacts: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real 8x8 test digits as PNG files (what a user uploads)."""
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i in (0, 1):
        pixels = (artifacts.test_images[i, 0].numpy() * 255).round().astype(np.uint8)
        path = folder / f"digit{i}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d))
    except Exception as exc:
        error = driver.find_element("id", "error")
        raise AssertionError(f"waited {WAIT_S:.0f}s for {what}; error box: {error.text!r}; "
                             f"console: {driver.get_log('browser')}") from exc


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def set_value(driver: Any, element_id: str, value: str) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(value)


def choose(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, element_id)).select_by_value(value)


def sample_sources(driver: Any) -> list[str]:
    return [img.get_attribute("src") for img in driver.find_elements("css selector", "#samples img")]


def open_explorer(driver: Any, server: harness.Server, model: str) -> None:
    driver.get(f"{server.url}/explore")
    wait_for(driver, lambda d: len(sample_sources(d)) == 36, "the first samples")
    choose(driver, "model", model)
    wait_for(driver, lambda d: f"{model} version 1" in by_id(d, "model-info").text, f"model {model}")
    wait_for(driver, lambda d: len(sample_sources(d)) == 36, f"samples of {model}")


def analysed(driver: Any) -> bool:
    p_value = by_id(driver, "p-value").text
    return by_id(driver, "analysis").is_displayed() and bool(re.fullmatch(r"[0-9.]+", p_value))


def test_page_loads_without_console_errors_and_samples_change_with_the_seed(server: harness.Server,
                                                                            chrome: Any) -> None:
    open_explorer(chrome, server, "tiny")
    options = [o.get_attribute("value") for o in chrome.find_elements("css selector", "#model option")]
    assert options == ["lin", "tiny", "tinyc"]
    first = sample_sources(chrome)
    set_value(chrome, "seed", "1")
    by_id(chrome, "sample").click()
    wait_for(chrome, lambda d: by_id(d, "samples").get_attribute("data-seed") == "1", "samples of seed 1")
    second = sample_sources(chrome)
    assert second != first
    set_value(chrome, "seed", "0")
    by_id(chrome, "sample").click()
    wait_for(chrome, lambda d: by_id(d, "samples").get_attribute("data-seed") == "0", "samples of seed 0")
    assert sample_sources(chrome) == first  # seeded: the same seed draws the same samples
    # A sample clicked is analysed like an upload.
    chrome.find_elements("css selector", "#samples img")[3].click()
    wait_for(chrome, analysed, "the analysis of a clicked sample")
    # A conditional model offers its classes; samples follow the chosen one.
    choose(chrome, "model", "tinyc")
    wait_for(chrome, lambda d: by_id(d, "label-field").is_displayed(), "the class selector")
    titles = {img.get_attribute("title") for img in chrome.find_elements("css selector", "#samples img")}
    assert all(", class 0:" in t for t in titles), titles
    assert not by_id(chrome, "error").is_displayed()
    assert browser.console_errors(chrome) == []


def test_an_uploaded_digit_gets_its_reconstruction_and_the_services_p_value(
        server: harness.Server, chrome: Any, digit_files: list[Path]) -> None:
    open_explorer(chrome, server, "tiny")
    by_id(chrome, "upload").send_keys(str(digit_files[0]))
    wait_for(chrome, analysed, "the analysis of the uploaded digit")
    for canvas in ("input-view", "reconstruction", "error-map"):
        assert by_id(chrome, canvas).get_attribute("width") == "8"  # the model's 8x8 input view
    # The page shows exactly what the API answers for the same image, seed and method.
    with open(digit_files[0], "rb") as f:
        files = [("images", ("d.png", f.read(), "image/png"))]
    answer = httpx.post(f"{server.url}/v1/models/tiny/anomaly-score", params={"seed": 0}, files=files).json()
    result = answer["results"][0]
    assert by_id(chrome, "p-value").text == f"{result['p_value']:.4f}"
    verdict = by_id(chrome, "verdict").text
    assert verdict.startswith("anomaly" if result["is_anomaly"] else "normal"), verdict
    likelihood = httpx.post(f"{server.url}/v1/models/tiny/log-likelihood", params={"seed": 0, "k": 1000},
                            files=files).json()["results"][0]
    assert by_id(chrome, "log-likelihood").text.startswith(f"{likelihood['log_likelihood']:.2f}")
    # Traversals: every latent dimension of the tiny model (4 < 6 rows), 7 values each.
    wait_for(chrome, lambda d: len(d.find_elements("css selector", ".traversal-row")) == 4, "the traversals")
    assert len(chrome.find_elements("css selector", ".traversal-row img")) == 4 * 7
    # Interpolation between this digit and a second one.
    by_id(chrome, "set-a").click()
    by_id(chrome, "upload").send_keys(str(digit_files[1]))
    wait_for(chrome, analysed, "the analysis of the second digit")
    by_id(chrome, "set-b").click()
    by_id(chrome, "interpolate").click()
    wait_for(chrome, lambda d: len(d.find_elements("css selector", "#interpolation img")) == 9,
             "the interpolation")
    assert not by_id(chrome, "error").is_displayed()
    assert browser.console_errors(chrome) == []


def test_a_drawing_is_analysed(server: harness.Server, chrome: Any) -> None:
    from selenium.webdriver import ActionChains

    open_explorer(chrome, server, "tiny")
    canvas = by_id(chrome, "draw")
    ActionChains(chrome).move_to_element_with_offset(canvas, -40, -80).click_and_hold() \
        .move_by_offset(30, 60).move_by_offset(30, 60).move_by_offset(0, 40).release().perform()
    by_id(chrome, "use-drawing").click()
    wait_for(chrome, analysed, "the analysis of the drawing")
    ink = chrome.execute_script(
        "const c = document.getElementById('input-view'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let s = 0;"
        " for (let i = 0; i < d.length; i += 4) s += d[i];"
        " return s;")
    assert ink > 0  # the strokes reached the model's input view
    assert browser.console_errors(chrome) == []


def test_an_api_key_typed_in_opens_a_protected_service_and_errors_are_shown(
        models_dir: Path, tmp_path: Path, chrome: Any, digit_files: list[Path]) -> None:
    with harness.start_server(models_dir, tmp_path / "service.log",
                              env={"VAE_HTTP_WORKERS": "1", "VAE_API_KEYS": KEY}) as protected:
        chrome.get(f"{protected.url}/explore")
        wait_for(chrome, lambda d: by_id(d, "error").is_displayed(), "the 401 message")
        assert "401 unauthorized" in by_id(chrome, "error").text
        assert "API key" in by_id(chrome, "error").text
        set_value(chrome, "api-key", KEY)
        by_id(chrome, "connect").click()
        wait_for(chrome, lambda d: len(sample_sources(d)) == 36, "samples with the key")
        assert not by_id(chrome, "error").is_displayed()
        choose(chrome, "model", "tiny")
        wait_for(chrome, lambda d: "tiny version 1" in by_id(d, "model-info").text, "model tiny")
        # A level the calibration cannot reach: the service's own 422 message appears on the page.
        set_value(chrome, "alpha", "0.000001")
        by_id(chrome, "upload").send_keys(str(digit_files[0]))
        wait_for(chrome, lambda d: by_id(d, "error").is_displayed(), "the 422 message")
        message = by_id(chrome, "error").text
        assert re.search(r"422 invalid_input: .*alpha", message), message
        # Only the refused requests themselves are logged, no script error.
        errors = [e for e in browser.console_errors(chrome)
                  if "status of 401" not in e and "status of 422" not in e]
        assert errors == []
        # The key was kept in the page only: reloading forgets it.
        chrome.refresh()
        wait_for(chrome, lambda d: "401 unauthorized" in by_id(d, "error").text, "the 401 after a reload")
        assert by_id(chrome, "api-key").get_attribute("value") == ""


@pytest.fixture(scope="module")
def vq_server(vq_artifact: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Server]:
    log = tmp_path_factory.mktemp("explorer-vq") / "service.log"
    with harness.start_server(vq_artifact.models_dir, log, env={"VAE_HTTP_WORKERS": "1"}) as running:
        yield running


def test_a_vq_model_shows_its_code_grid_and_decodes_an_edited_one(
        vq_server: harness.Server, chrome: Any, digit_files: list[Path]) -> None:
    browser.console_errors(chrome)  # drain: the API-key test's intended 401s stay in the browser's log
    chrome.get(f"{vq_server.url}/explore")
    wait_for(chrome, lambda d: len(sample_sources(d)) == 36, "the VQ model's samples")
    assert "2x2 codes of 8" in by_id(chrome, "model").text
    by_id(chrome, "upload").send_keys(str(digit_files[0]))
    wait_for(chrome, analysed, "the analysis of the uploaded digit")
    wait_for(chrome, lambda d: len(d.find_elements("css selector", "#code-grid input")) == 4, "the code grid")
    cells = chrome.find_elements("css selector", "#code-grid input")
    with open(digit_files[0], "rb") as f:
        files = [("images", ("d.png", f.read(), "image/png"))]
    codes = httpx.post(f"{vq_server.url}/v1/models/tinyvq/encode", files=files).json()["results"][0]["codes"]
    assert [int(c.get_attribute("value")) for c in cells] == [c for row in codes for c in row]
    assert not by_id(chrome, "traversal-section").is_displayed()  # Gaussian-only views are hidden
    assert not by_id(chrome, "interpolation-section").is_displayed()
    edited = (codes[0][0] + 1) % 8
    cells[0].clear()
    cells[0].send_keys(str(edited))
    by_id(chrome, "decode-codes").click()
    wait_for(chrome, lambda d: len(d.find_elements("css selector", "#code-decoded img")) == 1, "the decoding")
    shown = by_id(chrome, "code-decoded").find_element("css selector", "img").get_attribute("src")
    grid = [[edited, codes[0][1]], codes[1]]
    answer = httpx.post(f"{vq_server.url}/v1/models/tinyvq/decode", json={"codes": [grid]}).json()
    assert shown.endswith(answer["results"][0]["image"])  # the page shows the API's decoding of the edit
    assert not by_id(chrome, "error").is_displayed()
    assert browser.console_errors(chrome) == []
