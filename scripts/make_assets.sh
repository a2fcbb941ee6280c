#!/usr/bin/env bash
# Makes every figure in assets/ again, the ones README.md and docs/ show, from real photos, on the CPU:
#   1. the tutorial notebook, run on the sample with efficientnet_lite0 (offline weights) and its own
#      defaults otherwise: the training photos, training curves, sanity check, the photo that is not a
#      flower and the evaluation report in assets/report/; it prints the accuracies the notebook
#      reported (docs/benchmarks.md, Results);
#   2. the README's first command's model, its report with the held-out half of the non-flowers:
#      assets/calibration.png and assets/unknown_scores.png (docs/unknown-and-calibration.md);
#   3. that model exported and served to a headless Chromium: assets/web_app.png (skipped, saying so,
#      where chromium is not installed).
# A few minutes on an idle 2-core machine, 10-20 on a busy one.
#   scripts/make_assets.sh [DATA_DIR [NEGATIVES_DIR]]
#   (defaults: ../shared/data/flower_photos_sample and ../shared/data/not_flowers)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${1:-../shared/data/flower_photos_sample}
NEGATIVES=${2:-../shared/data/not_flowers}
SAVE=$(mktemp -d)
trap 'rm -rf "$SAVE"' EXIT

echo "== 1/3 the notebook's figures"
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

echo "== 2/3 calibration and unknown-score figures"
"$PYTHON" train.py "$DATA" --arch efficientnet_lite0 --epochs 5 --category_names "$DATA/cat_to_name.json" \
    --save_dir "$SAVE/run" --quiet
"$PYTHON" bench/bench_unknown.py "$DATA" --negatives "$NEGATIVES" --write_halves "$SAVE/negatives"
"$PYTHON" -m flower_classifier report "$SAVE/run/checkpoint.pth" "$DATA/test" \
    --negatives "$SAVE/negatives/held_out" --out "$SAVE/report"
cp "$SAVE/report/calibration.png" "$SAVE/report/unknown_scores.png" assets/

echo "== 3/3 the web page"
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    "$PYTHON" -m flower_classifier export "$SAVE/run/checkpoint.pth" "$SAVE/model.onnx"
    WEB_APP_MODEL="$SAVE/model.onnx" WEB_APP_SCREENSHOT=assets/web_app.png \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_web_e2e.py -k top_five
else
    echo "skipped assets/web_app.png: chromium is not installed (apt-get install chromium)"
fi
ls -l assets assets/report
