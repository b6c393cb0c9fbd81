#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from the system packages for the explorer's browser test
# (tests/explorer). Only where the machine allows: as root with apt-get. Elsewhere say why and go on; the
# browser test then skips with that reason. Never fails the caller.
set -uo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_browser: no chromium/chromedriver and cannot apt-get install them (not root, or no apt);" \
         "the browser test will be skipped. Install the packages chromium and chromium-driver to run it." >&2
    exit 0
fi
echo "install_browser: installing chromium chromium-driver (apt)" >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/tmp/install_browser.log 2>&1; then
    echo "install_browser: apt-get failed (see /tmp/install_browser.log); the browser test will be skipped" >&2
fi
exit 0
