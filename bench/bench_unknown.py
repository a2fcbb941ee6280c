"""Which score tells "not one of my species" best, and does temperature scaling calibrate: issue 13's
figures on real photos.

    python bench/bench_unknown.py ../shared/data/flower_photos_sample --negatives ../shared/data/not_flowers

Trains the head as `train.py` does (cached centre-crop features of the frozen backbone), then, for
each unknown score of `calibration`, fits what it needs on the train split and its threshold on the
valid split. The negatives (photos that are none of the species) are split in two halves with a
fixed seed: the "tuning" half may choose a threshold, the "held-out" half is only ever scored, so
its figures are honest. Printed per score: AUROC of test species vs held-out negatives; at the
validation-only threshold (keep 95% of valid species) and at the threshold chosen with the tuning
half: held-out negatives caught, test species wrongly called unknown, top-1 accuracy on the test
species accepted. Then ECE (15 bins) on test before and after temperature scaling. The same again
averaged over several head seeds and negative splits, since 50 test photos move figures in 2% steps.
The best score is picked by the validation-threshold figures, the issue's goal, never by tuning on
the held-out half.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flower_classifier import calibration as cal  # noqa: E402
from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.checkpoint import load_checkpoint  # noqa: E402
from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.images import list_photos  # noqa: E402
from flower_classifier.features import FeatureStore, cached_features, centre_view  # noqa: E402
from flower_classifier.model import build_head  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402

COLUMNS = ("AUROC", "caught", "all", "rejected", "acc-kept", "caught*", "rejected*", "acc-kept*", "bytes")


def negative_halves(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (tuning, held-out) halves of `count` negatives, by index: the one split rule of this bench."""
    order = np.random.default_rng(seed).permutation(count)
    return order[: count // 2], order[count // 2:]


def write_halves(negatives_dir: Path, out: Path, seed: int = 0) -> None:
    """out/tuning and out/held_out: links to seed `seed`'s halves of the negatives (all readable), so that
    `train.py`/`calibrate --negatives out/tuning` and `evaluate --negatives out/held_out` use the bench's split."""
    photos = list_photos(negatives_dir)
    for name, half in zip(("tuning", "held_out"), negative_halves(len(photos), seed)):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in half:
            (out / name / photos[i].name).symlink_to(photos[i].resolve())
    print(f"{out}/tuning and {out}/held_out: seed {seed}'s halves of the {len(photos)} photos of {negatives_dir}")


def split_features(backbone, data_dir: Path, negatives_dir: Path, cache_dir) -> dict[str, tuple]:
    """(features (N, D) float32 of the float16 cache, labels (N,), paths) per split, and the negatives
    (label -1)."""
    store = FeatureStore(cache_dir, backbone)
    train = FlowerFolder(split_dir(data_dir, "train"))
    folders = {"train": train, "valid": FlowerFolder(split_dir(data_dir, "valid"), classes=train.classes),
               "test": FlowerFolder(split_dir(data_dir, "test"), classes=train.classes)}
    samples = {name: folder.samples for name, folder in folders.items()}
    samples["negatives"] = [(p, -1) for p in list_photos(negatives_dir)]
    out = {}
    for name, pairs in samples.items():
        x, ok = cached_features(backbone, [p for p, _ in pairs], centre_view(backbone), store, progress=False)
        out[name] = (x[ok].float().numpy(), np.array([y for _, y in pairs])[ok.numpy()],
                     [p for (p, _), good in zip(pairs, ok.tolist()) if good])
    return out


def train_head_logits(backbone, data_dir: Path, feats: dict, seed: int, cache_dir) -> dict[str, np.ndarray]:
    """Logits of every split under the head `train.py --arch ... --seed seed` keeps (its best epoch)."""
    config = TrainConfig(arch=backbone.name, seed=seed, num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(config, data_dir, save_dir=tmp, backbone=backbone, cache_dir=cache_dir,
                              progress=False, log=lambda m: None)
        ckpt = load_checkpoint(result.best_path)
    head = build_head(backbone.feature_dim, ckpt.config.hidden_units, len(ckpt.classes), ckpt.config.dropout)
    head.load_state_dict(ckpt.head_state)
    with torch.inference_mode():
        return {name: head.eval()(torch.from_numpy(x)).numpy() for name, (x, *_) in feats.items()}


def figures(method: str, feats: dict, logits: dict, tune: np.ndarray, held: np.ndarray, keep: float,
            **fit_options) -> dict[str, float]:
    (xtr, ytr, _), (xva, yva, _), (xte, yte, _), (xneg, *_) = (feats[s] for s in ("train", "valid", "test",
                                                                                     "negatives"))
    common = dict(method=method, valid_features=xva, train_features=xtr, train_labels=ytr, keep=keep, **fit_options)
    plain = cal.fit_calibration(logits["valid"], yva, **common)
    tuned = cal.fit_calibration(logits["valid"], yva, negative_logits=logits["negatives"][tune],
                                negative_features=xneg[tune], **common)
    species = plain.scores(logits["test"], xte)
    negatives = plain.scores(logits["negatives"][held], xneg[held])
    correct = logits["test"].argmax(1) == yte
    a = cal.detection_metrics(species, correct, negatives, plain.threshold)
    b = cal.detection_metrics(species, correct, negatives, tuned.threshold)
    everyone = plain.scores(logits["negatives"], xneg)  # no negative chose the validation-only threshold
    return {"AUROC": a["auroc"], "caught": a["negatives_caught"], "all": float((everyone > plain.threshold).mean()),
            "rejected": a["species_rejected"],
            "acc-kept": a["accepted_accuracy"], "caught*": b["negatives_caught"],
            "rejected*": b["species_rejected"], "acc-kept*": b["accepted_accuracy"],
            "bytes": plain.storage_bytes(), "accuracy": a["accuracy"], "rule*": tuned.rule}


def cross_fitted_ece(backbone, feats: dict, classes: list[str], folds: int, cache_dir) -> tuple:
    """ECE before / after temperature scaling and its noise floors over all species photos (train + valid
    + test), each scored by a head that never saw it: per fold, `train.py`'s head trained on a folder
    of links to the other photos (10 per class of them as its valid split, which fits T)."""
    x = np.concatenate([feats[s][0] for s in ("train", "valid", "test")])
    y = np.concatenate([feats[s][1] for s in ("train", "valid", "test")])
    paths = [p for s in ("train", "valid", "test") for p in feats[s][2]]
    rng = np.random.default_rng(0)
    fold = np.empty(len(y), dtype=int)
    for c in np.unique(y):  # stratified: each fold holds its share of every class
        where = rng.permutation(np.flatnonzero(y == c))
        fold[where] = np.arange(len(where)) % folds
    before, after, temperatures = np.zeros((len(y), len(classes))), np.zeros((len(y), len(classes))), []
    for k in range(folds):
        rest = np.flatnonzero(fold != k)
        valid = set(np.concatenate([rng.permutation(rest[y[rest] == c])[:10] for c in np.unique(y)]).tolist())
        with tempfile.TemporaryDirectory() as tmp:
            for i in rest:  # links keep each photo's bytes, so the feature cache serves them
                link = Path(tmp) / ("valid" if i in valid else "train") / classes[y[i]] / f"{i}{paths[i].suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(paths[i]).resolve())
            part = {"valid": (x[sorted(valid)], y[sorted(valid)]), "held": (x[fold == k], y[fold == k])}
            logits = train_head_logits(backbone, Path(tmp), part, k, cache_dir)
        t = cal.fit_temperature(logits["valid"], part["valid"][1])
        before[fold == k], after[fold == k] = cal.softmax(logits["held"]), cal.softmax(logits["held"], t)
        temperatures.append(t)
    return (temperatures, cal.expected_calibration_error(before, y), cal.expected_calibration_error(after, y),
            cal.ece_noise_floor(before), cal.ece_noise_floor(after), float((before.argmax(1) == y).mean()), len(y))


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'score':<22}" + "".join(f"{c:>10}" for c in COLUMNS))
    for name, row in rows.items():
        cells = [f"{row['AUROC']:>10.4f}"] + [f"{100 * row[c]:>9.1f}%" for c in COLUMNS[1:-1]]
        print(f"{name:<22}" + "".join(cells) + f"{row['bytes']:>10,}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--negatives", type=Path, required=True, help="photos that are none of the species")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--keep", type=float, default=cal.KEEP, help="share of valid species kept (default 0.95)")
    p.add_argument("--seeds", type=int, default=5, help="head seeds and negative splits to average (default 5)")
    p.add_argument("--cache_dir", default=None, help="feature cache (default: $FLOWER_CLASSIFIER_CACHE or ~/.cache)")
    p.add_argument("--write_halves", type=Path, default=None, metavar="DIR",
                   help="only write DIR/tuning and DIR/held_out (links to seed 0's halves of --negatives) and stop")
    args = p.parse_args(argv)
    if args.write_halves:
        write_halves(args.negatives, args.write_halves)
        return 0

    backbone = build_backbone(args.arch)
    feats = split_features(backbone, args.data_dir, args.negatives, args.cache_dir)
    n_neg = len(feats["negatives"][1])
    print(f"{args.arch}; {args.data_dir}: " + ", ".join(f"{s} {len(feats[s][1])}" for s in ("train", "valid", "test"))
          + f"; {args.negatives}: {n_neg} photos, halves chosen by seed: tuning / held-out")
    print("caught / all / rejected / acc-kept: held-out negatives called unknown (all: of all negatives, none of "
          "which chose this threshold), test species called unknown, top-1 on test species accepted, at the "
          f"threshold keeping {args.keep:.0%} of valid species; starred: at the threshold chosen with the tuning "
          "half. AUROC: test species vs held-out negatives. bytes: arrays stored (float16; base64 in JSON +33%).\n")
    variants = {m: (m, {}) for m in cal.METHODS}
    variants.update({f"mahalanobis rank {r}": ("mahalanobis", {"max_rank": r}) for r in (0, 16, 256)})

    runs: dict[str, list[dict]] = {name: [] for name in variants}
    ece, rules = [], []
    yva, yte = feats["valid"][1], feats["test"][1]
    for seed in range(args.seeds):
        logits = train_head_logits(backbone, args.data_dir, feats, seed, args.cache_dir)
        tune, held = negative_halves(n_neg, seed)
        rows = {name: figures(method, feats, logits, tune, held, args.keep, **options)
                for name, (method, options) in variants.items()}
        for name, row in rows.items():
            runs[name].append(row)
        t = cal.fit_temperature(logits["valid"], yva)
        before, after = cal.softmax(logits["test"]), cal.softmax(logits["test"], t)
        ece.append((t, cal.expected_calibration_error(before, yte), cal.expected_calibration_error(after, yte),
                    cal.ece_noise_floor(after), cal.nll(logits["test"], yte), cal.nll(logits["test"], yte, t),
                    rows["msp"]["accuracy"]))
        if seed == 0:
            print(f"head seed 0, negative split seed 0 ({len(tune)} tuning / {len(held)} held-out); "
                  f"test top-1 {100 * rows['msp']['accuracy']:.0f}%")
            print_table(rows)
            rules = {name: row["rule*"] for name, row in rows.items()}
    mean = {name: {c: statistics.mean(r[c] for r in rs) for c in COLUMNS} for name, rs in runs.items()}
    print(f"\nmean over {args.seeds} head seeds x negative splits")
    print_table(mean)
    goals = [n for n in cal.METHODS if mean[n]["all"] >= 0.95 and mean[n]["AUROC"] >= 0.99]
    print(f"\nmeeting both goals (>= 95% of negatives caught at the validation threshold, AUROC >= 0.99): "
          f"{', '.join(goals) or 'none'}; highest AUROC: {max(cal.METHODS, key=lambda n: mean[n]['AUROC'])}; "
          f"most caught: {max(cal.METHODS, key=lambda n: mean[n]['all'])}")
    for name in goals:
        print(f"  {name}, threshold with the tuning half (seed 0): {rules[name]}")

    print(f"\ntest split ({len(yte)} photos), T fitted on valid ({len(yva)}); floor: the ECE a perfectly "
          f"calibrated model with the same confidences shows on this many photos")
    print(f"{'seed':>4} {'T':>6} {'ECE before':>11} {'ECE after':>10} {'floor':>6} {'NLL before':>11} "
          f"{'NLL after':>10} {'top-1':>6}")
    for seed, (t, before, after, floor, nll_before, nll_after, acc) in enumerate(ece):
        print(f"{seed:>4} {t:>6.3f} {100 * before:>10.1f}% {100 * after:>9.1f}% {100 * floor:>5.1f}% "
              f"{nll_before:>11.3f} {nll_after:>10.3f} {100 * acc:>5.0f}%")
    m = [statistics.mean(col) for col in zip(*ece)]
    print(f"mean {m[0]:>6.3f} {100 * m[1]:>10.1f}% {100 * m[2]:>9.1f}% {100 * m[3]:>5.1f}% {m[4]:>11.3f} "
          f"{m[5]:>10.3f} {100 * m[6]:>5.0f}%")

    classes = FlowerFolder(split_dir(args.data_dir, "train")).classes
    ts, before, after, floor_before, floor_after, acc, n = cross_fitted_ece(backbone, feats, classes, 5,
                                                                          args.cache_dir)
    print(f"\ncross-fitted, all {n} species photos (5 folds, each scored by a head that never saw it; "
          f"top-1 {100 * acc:.1f}%; T per fold {', '.join(f'{t:.2f}' for t in ts)}):")
    print(f"ECE before {100 * before:.1f}% (floor {100 * floor_before:.1f}%), after {100 * after:.1f}% "
          f"(floor {100 * floor_after:.1f}%)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
