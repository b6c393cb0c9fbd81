"""Headless Chromium from the system packages, driven by Selenium: shared by the explorer's browser test
(tests/explorer) and the screenshot script (scripts/explorer_screenshots.py).

Nothing is downloaded: the browser and its driver are the Debian packages `chromium` and
`chromium-driver` (scripts/install_browser.sh installs them where the machine allows), and Selenium
Manager is told to stay offline.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

BROWSER_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_CANDIDATES = ("chromedriver", "chromium-driver")


def find_browser() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when either is missing."""
    browser = next((p for p in map(shutil.which, BROWSER_CANDIDATES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_CANDIDATES) if p), None)
    return (browser, driver) if browser and driver else None


def missing_reason() -> str | None:
    """Why no browser test can run here, or None when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra installs it)"
    if find_browser() is None:
        return ("no Chromium and chromedriver on PATH: install the system packages `chromium "
                "chromium-driver` "
                "(scripts/install_browser.sh does it as root with apt)")
    return None


def start_chrome(width: int = 1280, height: int = 1400) -> Any:
    """A headless Chrome WebDriver that records the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    assert found is not None, missing_reason()
    browser, driver = found
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def console_errors(driver: Any) -> list[str]:
    """The SEVERE console messages since the last call (page errors, failed loads, CSP violations)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
