#!/usr/bin/env bash
# Installs the native load generators of the serving benchmark (hey, and wrk beside it) with apt when
# hey is missing. Needs root (or sudo) and Debian's package lists.
set -euo pipefail
if command -v hey >/dev/null 2>&1; then
    echo "hey: $(command -v hey) ($(dpkg-query -W -f='${Version}' hey 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi
$SUDO apt-get update
$SUDO apt-get install -y hey wrk
command -v hey
