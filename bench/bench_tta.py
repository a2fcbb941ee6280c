"""Does test-time augmentation pay, and which views: issue 16 item 5's figures on real photos.

    python bench/bench_tta.py CHECKPOINT [CHECKPOINT ...] --data ../shared/data/flower_photos_sample \
        --negatives ../shared/data/not_flowers

Each checkpoint runs once over every candidate view of the test split's photos (and the valid
split's, a second held-out set: 50 test photos move top-1 in 2% steps); the view sets are then
combined as `predictor.average_views` does (logits and features averaged, the checkpoint's
calibration applied to the averages). Printed per view set, averaged over the checkpoints: top-1 on
test and on test + valid, ECE after the checkpoint's temperature, and the model time per photo
(the sum of its views' passes). The views:

    mirror        the photo flipped left-right (what `--tta` ships)
    zoom          the central 87.5% of the model's input, scaled back up (bilinear)
    5-crop        the four corners' 87.5% crops and the zoom
    wider         the whole shorter side instead of the centre crop (from the photo, not the array)

For plain and mirror, also probabilities averaged instead of logits (the alternative), and with
`--negatives` the unknown answer: AUROC species vs not-species, negatives caught and species
rejected at the checkpoint's threshold. Last, `evaluate_checkpoint` with and without `tta` on the
first checkpoint: end-to-end seconds, decoding included.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from flower_classifier import calibration as cal, unknown as unk  # noqa: E402
from flower_classifier.evaluation import evaluate_checkpoint  # noqa: E402
from flower_classifier.images import decode_image, list_photos, preprocess, to_rgb  # noqa: E402
from flower_classifier.predictor import load_predictor, mirrored  # noqa: E402

ZOOM = 0.875


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 3, h, w) -> (N, 3, size, size), half-pixel centres as torch's align_corners=False."""
    def axis_weights(n: int):
        src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n - 1)
        return low, high, (src - low).astype(np.float32)

    lo, hi, w = axis_weights(images.shape[2])
    rows = images[:, :, lo] * (1 - w)[:, None] + images[:, :, hi] * w[:, None]  # (N, 3, size, w)
    lo, hi, w = axis_weights(images.shape[3])
    return np.ascontiguousarray(rows[..., lo] * (1 - w) + rows[..., hi] * w)


def crop_view(top: float, left: float):
    """A view: the ZOOM crop whose top-left corner sits at (top, left) of the free margin, scaled up."""
    def view(images: np.ndarray) -> np.ndarray:
        size = images.shape[-1]
        crop = int(round(ZOOM * size))
        y, x = int(round(top * (size - crop))), int(round(left * (size - crop)))
        return resize_bilinear(images[..., y:y + crop, x:x + crop], size)
    return view


def split_photos(data: Path, split: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, targets = [], []
    for index, category in enumerate(classes):
        folder = data / split / category
        found = list_photos(folder) if folder.is_dir() else []
        paths += found
        targets += [index] * len(found)
    return paths, np.array(targets)


def wider(predictor, path: Path) -> np.ndarray:
    """The photo with its shorter side at the input size: all of it that a square shows, no centre crop."""
    p = predictor.preprocessing
    image = to_rgb(decode_image(path, min_size=p.resize_size))
    return preprocess(image, type(p)(p.input_size, p.input_size, p.mean, p.std, p.interpolation))


def run_views(predictor, images: np.ndarray, views: dict, batch: int = 32) -> tuple[dict, dict]:
    """Outputs and seconds of each view over `images` (N, 3, S, S), `batch` photos at a time."""
    outputs, seconds = {}, {}
    for name, view in views.items():
        start, logits, features = time.perf_counter(), [], []
        for i in range(0, len(images), batch):
            chunk = view(images[i:i + batch])
            out = predictor.outputs(np.ascontiguousarray(chunk))
            logits.append(out[0])
            features.append(out[1])
        seconds[name] = (time.perf_counter() - start) / len(images)
        outputs[name] = (np.concatenate(logits), np.concatenate(features))
    return outputs, seconds


CORNERS = {"tl": crop_view(0, 0), "tr": crop_view(0, 1), "bl": crop_view(1, 0), "br": crop_view(1, 1)}
VIEWS = {"plain": lambda x: x, "mirror": mirrored, "zoom": crop_view(0.5, 0.5),
         "zoom-mirror": lambda x: crop_view(0.5, 0.5)(mirrored(x)), **CORNERS,
         **{f"{k}-mirror": (lambda v: lambda x: v(mirrored(x)))(v) for k, v in CORNERS.items()}}
SETS = {"plain (no TTA)": ["plain"], "+ mirror (--tta)": ["plain", "mirror"], "+ zoom": ["plain", "zoom"],
        "+ mirror + zoom (x2)": ["plain", "mirror", "zoom", "zoom-mirror"],
        "5-crop (zoom + corners)": ["plain", "zoom", *CORNERS],
        "5-crop + mirrors": ["plain", "mirror", "zoom", "zoom-mirror", *CORNERS, *(f"{k}-mirror" for k in CORNERS)],
        "+ wider": ["plain", "wider"], "+ mirror + wider (x2)": ["plain", "mirror", "wider", "wider-mirror"]}


def figures(calibration, outputs: dict, seconds: dict, names: list[str], targets: np.ndarray, n_test: int,
            negatives: dict | None, average: str = "logits") -> dict:
    logits = np.mean([outputs[n][0] for n in names], axis=0)
    features = np.mean([outputs[n][1] for n in names], axis=0)
    if average == "logits":
        probabilities = calibration.probabilities(logits)
    else:  # the alternative: each view's calibrated probabilities, averaged
        probabilities = np.mean([calibration.probabilities(outputs[n][0]) for n in names], axis=0)
    correct = probabilities.argmax(1) == targets
    row = {"test": correct[:n_test].mean(), "both": correct.mean(),
           "ece": cal.expected_calibration_error(probabilities[:n_test], targets[:n_test]),
           "ms": 1000 * sum(seconds[n] for n in names)}
    if negatives is not None and all(n in negatives for n in names) and average == "logits":
        species = calibration.scores(logits[:n_test], features[:n_test])
        others = calibration.scores(np.mean([negatives[n][0] for n in names], axis=0),
                                    np.mean([negatives[n][1] for n in names], axis=0))
        row.update(auroc=unk.auroc(species, others), caught=float((others > calibration.threshold).mean()),
                   rejected=float((species > calibration.threshold).mean()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True, help="photo folder with valid/ and test/")
    parser.add_argument("--negatives", default=None, help="photos that are none of the species")
    args = parser.parse_args()
    data = Path(args.data)
    rows: dict[str, list[dict]] = {}
    for checkpoint in args.checkpoints:
        predictor = load_predictor(checkpoint, onnx=False)
        calibration = predictor.calibration or cal.Calibration()
        test, test_targets = split_photos(data, "test", predictor.classes)
        valid, valid_targets = split_photos(data, "valid", predictor.classes)
        photos, targets = test + valid, np.concatenate([test_targets, valid_targets])
        images = np.stack([predictor.prepare(p) for p in photos])
        outputs, seconds = run_views(predictor, images, VIEWS)
        wide = np.stack([wider(predictor, p) for p in photos])
        more, more_seconds = run_views(predictor, wide, {"wider": lambda x: x, "wider-mirror": mirrored})
        outputs.update(more)
        seconds.update(more_seconds)
        negatives = None
        if args.negatives:
            others = np.stack([predictor.prepare(p) for p in list_photos(Path(args.negatives))])
            negatives, _ = run_views(predictor, others, {"plain": VIEWS["plain"], "mirror": mirrored})
        for label, names in SETS.items():
            rows.setdefault(label, []).append(figures(calibration, outputs, seconds, names, targets, len(test),
                                                      negatives))
        for label, names in (("plain, probabilities", ["plain"]), ("+ mirror, probabilities averaged",
                                                                    ["plain", "mirror"])):
            rows.setdefault(label, []).append(figures(calibration, outputs, seconds, names, targets, len(test),
                                                      None, average="probabilities"))
        print(f"{checkpoint}: {len(test)} test + {len(valid)} valid photos", file=sys.stderr, flush=True)

    def mean(label: str, key: str) -> str:
        values = [r[key] for r in rows[label] if key in r]
        if not values:
            return "-"
        if key == "ms":
            return f"{statistics.mean(values):.0f}"
        return f"{100 * statistics.mean(values):.1f}" + (f" ({100 * min(values):.0f}-{100 * max(values):.0f})"
                                                         if key == "test" else "")

    print(f"\nmeans over {len(args.checkpoints)} checkpoints (test: mean (min-max) %; both: test + valid):")
    header = ["views", "test top-1", "test+valid", "ECE", "ms/photo", "AUROC", "neg. caught", "species rejected"]
    print(" | ".join(header))
    for label in rows:
        print(" | ".join([label, *(mean(label, k) for k in ("test", "both", "ece", "ms", "auroc", "caught",
                                                            "rejected"))]))
    split = data / "test"
    for tta in (False, True):
        start = time.perf_counter()
        m = evaluate_checkpoint(args.checkpoints[0], split, progress=False, tta=tta)
        print(f"evaluate_checkpoint(tta={tta}): top-1 {100 * m['accuracy']:.1f}%, ECE {100 * m['ece_after']:.1f}%, "
              f"{time.perf_counter() - start:.1f} s for {m['count']} photos")


if __name__ == "__main__":
    main()
