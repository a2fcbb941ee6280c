#!/usr/bin/env bash
# Installs the test extras into .venv (after setup.sh) and runs the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
# The browser test drives Debian's chromium (Playwright's own browser download needs the internet).
# CI runs as root on a fresh machine: install it there; elsewhere the test skips, saying why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed (sudo apt-get install chromium); tests/test_web_e2e.py will skip" >&2
  fi
fi
.venv/bin/python -m pytest -q "$@"
