#!/usr/bin/env bash
# Installs the test extras into .venv (after setup.sh) and runs the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
.venv/bin/python -m pytest -q "$@"
