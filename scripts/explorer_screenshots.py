"""Screenshots of the explorer for docs/: the real service on the committed models, driven by headless
Chromium (scripts/browser.py). Needs the system packages chromium and chromium-driver.

    .venv/bin/python scripts/explorer_screenshots.py   # docs/explorer.png, docs/explorer-flagged.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "reliability")]

import browser  # noqa: E402
import harness  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = HERE.parent
EXAMPLES = ROOT / "docs" / "examples"


def count(driver, selector: str) -> int:
    return len(driver.find_elements("css selector", selector))


def analyse(driver, path: Path) -> None:
    previous = driver.find_element("id", "log-likelihood").text
    driver.find_element("id", "upload").send_keys(str(path))
    WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "analysis").is_displayed()
                                    and d.find_element("id", "log-likelihood").text not in ("", previous)
                                    and len(d.find_elements("css selector", ".traversal-row")) == 6)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            harness.start_server(ROOT / "models", Path(tmp) / "service.log",
                                 env={"VAE_HTTP_WORKERS": "1"}) as server:
        driver = browser.start_chrome(width=1280, height=2050)
        try:
            driver.get(f"{server.url}/explore")
            WebDriverWait(driver, 60).until(lambda d: count(d, "#samples img") == 36)
            driver.find_elements("css selector", "#samples img")[19].click()  # seed 0's 20th sample, a 3
            WebDriverWait(driver, 60).until(lambda d: count(d, ".traversal-row") == 6)
            driver.find_element("id", "set-b").click()
            analyse(driver, EXAMPLES / "digit.png")
            driver.find_element("id", "set-a").click()
            driver.find_element("id", "interpolate").click()
            WebDriverWait(driver, 60).until(lambda d: count(d, "#interpolation img") == 9)
            driver.save_screenshot(str(ROOT / "docs" / "explorer.png"))
            analyse(driver, EXAMPLES / "mirrored.png")
            section = driver.find_element("id", "input-section")
            section.screenshot(str(ROOT / "docs" / "explorer-flagged.png"))
            assert browser.console_errors(driver) == [], browser.console_errors(driver)
        finally:
            driver.quit()
    print("wrote docs/explorer.png and docs/explorer-flagged.png")


if __name__ == "__main__":
    main()
