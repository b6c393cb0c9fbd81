"""Screenshots of the explorer for docs/, and the time a new user waits: the real service started as
`make serve` starts it (`python -m service`, default settings, the committed models), driven by headless
Chromium (scripts/browser.py). Needs the system packages chromium and chromium-driver.

    .venv/bin/python scripts/explorer_screenshots.py
    # -> docs/explorer.png, docs/explorer-flagged.png, benchmarks/results/explorer_first_minute.json

Timed: process start -> /readyz 200; page opened -> samples shown; image chosen -> verdict shown.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "reliability")]

import browser  # noqa: E402
import harness  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = HERE.parent
EXAMPLES = ROOT / "docs" / "examples"


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.machine()


def count(driver, selector: str) -> int:
    return len(driver.find_elements("css selector", selector))


def analyse(driver, path: Path) -> None:
    previous = driver.find_element("id", "log-likelihood").text
    driver.find_element("id", "upload").send_keys(str(path))
    WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "analysis").is_displayed()
                                    and d.find_element("id", "log-likelihood").text not in ("", previous)
                                    and len(d.find_elements("css selector", ".traversal-row")) == 6)


def main() -> None:
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = harness.free_port()
        started = time.monotonic()
        proc = harness.spawn([sys.executable, "-m", "service", "--host", harness.HOST, "--port", str(port)],
                             Path(tmp) / "service.log", dict(os.environ))
        driver = None
        try:
            url = f"http://{harness.HOST}:{port}"
            log = Path(tmp) / "service.log"
            timings["start_to_ready_s"] = harness.wait_until_ready(proc, f"{url}/readyz", log, timeout=120)
            driver = browser.start_chrome(width=1280, height=2050)
            opened = time.monotonic()
            driver.get(f"{url}/explore")
            WebDriverWait(driver, 60).until(lambda d: count(d, "#samples img") == 36)
            timings["page_to_samples_s"] = time.monotonic() - opened
            chosen = time.monotonic()
            analyse(driver, EXAMPLES / "mirrored.png")
            timings["upload_to_verdict_s"] = time.monotonic() - chosen
            timings["start_to_verdict_s"] = time.monotonic() - started
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
            if driver is not None:
                driver.quit()
            harness.kill_tree(proc)
    result = {"machine": cpu_name(), "cpus": os.cpu_count(),
              "command": "python scripts/explorer_screenshots.py",
              **{k: round(v, 2) for k, v in timings.items()}}
    harness.write_json(ROOT / "benchmarks" / "results" / "explorer_first_minute.json", result)
    print(json.dumps(result, indent=2))
    print("wrote docs/explorer.png and docs/explorer-flagged.png")


if __name__ == "__main__":
    main()
