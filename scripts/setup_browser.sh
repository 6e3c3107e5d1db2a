#!/usr/bin/env bash
# Installs the headless browser the review page's test opens it in (Debian's chromium):
#   bash scripts/setup_browser.sh
# Idempotent: when a chromium binary is already on the PATH it only says so. Needs root (apt-get);
# without it, or without apt-get, it says what to install and exits 0, and the browser test skips.
set -euo pipefail

for bin in chromium chromium-browser; do
    if command -v "$bin" >/dev/null 2>&1; then
        echo "[setup_browser] $bin present: $("$bin" --version 2>/dev/null || echo "version unknown")"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup_browser] no apt-get here: install a chromium yourself for the review page's browser test"
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "[setup_browser] not root: run 'apt-get install -y chromium' as root for the review page's browser test"
        exit 0
    fi
fi
echo "[setup_browser] installing chromium (Debian package)"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
chromium --version
