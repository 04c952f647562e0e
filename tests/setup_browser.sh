#!/usr/bin/env bash
# Set-up step for the `browser` tests (tests/test_report.py, tests/test_tune.py): headless Chromium.
# Run once per machine before pytest (the README's test command does); the tests never install anything.
#   bash tests/setup_browser.sh          # installs Debian's `chromium` package with apt-get if missing
# Needs root (or sudo) and a Debian/Ubuntu package source. Elsewhere install any Chromium/Chrome and put it on
# PATH as `chromium`, or point CHROMIUM at it: CHROMIUM=/path/to/chrome pytest ...
set -euo pipefail

found="${CHROMIUM:-}"
if [ -z "$found" ]; then
    found="$(command -v chromium || true)"
fi
if [ -n "$found" ] && [ -x "$found" ]; then
    echo "chromium: $found ($("$found" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "error: no chromium on PATH and no apt-get here; install Chromium and set CHROMIUM=/path/to/it" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends chromium; then
    $SUDO apt-get update   # stale package lists: refresh once, then retry
    $SUDO apt-get install -y --no-install-recommends chromium
fi
exe="$(command -v chromium)" || { echo "error: apt-get installed chromium but it is not on PATH" >&2; exit 1; }
echo "chromium: $exe ($("$exe" --version))"
