#!/usr/bin/env bash
# Regenerates the notebook's figures in assets/ (training_images, training_curves, sanity_check,
# not_a_flower, report/) by running the tutorial notebook on real photos: efficientnet_lite0 (offline
# weights) on the 300-photo sample, on the CPU, with the notebook's own defaults otherwise; then prints
# the accuracies the notebook reported (for the docs).
#   scripts/make_assets.sh [DATA_DIR]      (default: ../shared/data/flower_photos_sample)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${1:-../shared/data/flower_photos_sample}
SAVE=$(mktemp -d)
trap 'rm -rf "$SAVE"' EXIT
"$PYTHON" -m flower_classifier.notebook Image_Classifier_Project.ipynb \
    -p DATA_DIR "$DATA" -p ARCH efficientnet_lite0 -p DEVICE cpu -p SAVE_DIR "$SAVE" -p ASSETS_DIR assets \
    --save_to "$SAVE/executed.ipynb"
"$PYTHON" - "$SAVE/executed.ipynb" <<'PY'
import sys

import nbformat

for cell in nbformat.read(sys.argv[1], as_version=4).cells:
    for output in cell.get("outputs", []):
        for line in output.get("text", "").splitlines() if output.get("name") == "stdout" else []:
            if "accuracy" in line or "species" in line:
                print(line)
PY
ls -l assets assets/report
