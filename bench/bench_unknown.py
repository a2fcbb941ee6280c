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
from flower_classifier.data import FlowerFolder, list_images, split_dir  # noqa: E402
from flower_classifier.features import FeatureStore, cached_features, centre_view  # noqa: E402
from flower_classifier.model import build_head  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402

COLUMNS = ("AUROC", "caught", "rejected", "acc-kept", "caught*", "rejected*", "acc-kept*", "bytes")


def split_features(backbone, data_dir: Path, negatives_dir: Path, cache_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(features (N, D) float32 of the float16 cache, labels (N,)) per split, and the negatives (label -1)."""
    store = FeatureStore(cache_dir, backbone)
    train = FlowerFolder(split_dir(data_dir, "train"))
    folders = {"train": train, "valid": FlowerFolder(split_dir(data_dir, "valid"), classes=train.classes),
               "test": FlowerFolder(split_dir(data_dir, "test"), classes=train.classes)}
    samples = {name: folder.samples for name, folder in folders.items()}
    samples["negatives"] = [(p, -1) for p in list_images(negatives_dir)]
    out = {}
    for name, pairs in samples.items():
        x, ok = cached_features(backbone, [p for p, _ in pairs], centre_view(backbone), store, progress=False)
        out[name] = (x[ok].float().numpy(), np.array([y for _, y in pairs])[ok.numpy()])
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
        return {name: head.eval()(torch.from_numpy(x)).numpy() for name, (x, _) in feats.items()}


def figures(method: str, feats: dict, logits: dict, tune: np.ndarray, held: np.ndarray, keep: float,
            **fit_options) -> dict[str, float]:
    (xtr, ytr), (xva, yva), (xte, yte), (xneg, _) = (feats[s] for s in ("train", "valid", "test", "negatives"))
    common = dict(method=method, valid_features=xva, train_features=xtr, train_labels=ytr, keep=keep, **fit_options)
    plain = cal.fit_calibration(logits["valid"], yva, **common)
    tuned = cal.fit_calibration(logits["valid"], yva, negative_logits=logits["negatives"][tune],
                                negative_features=xneg[tune], **common)
    species = plain.scores(logits["test"], xte)
    negatives = plain.scores(logits["negatives"][held], xneg[held])
    correct = logits["test"].argmax(1) == yte
    a = cal.detection_metrics(species, correct, negatives, plain.threshold)
    b = cal.detection_metrics(species, correct, negatives, tuned.threshold)
    return {"AUROC": a["auroc"], "caught": a["negatives_caught"], "rejected": a["species_rejected"],
            "acc-kept": a["accepted_accuracy"], "caught*": b["negatives_caught"],
            "rejected*": b["species_rejected"], "acc-kept*": b["accepted_accuracy"],
            "bytes": plain.storage_bytes(), "accuracy": a["accuracy"], "rule*": tuned.rule}


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
    args = p.parse_args(argv)

    backbone = build_backbone(args.arch)
    feats = split_features(backbone, args.data_dir, args.negatives, args.cache_dir)
    n_neg = len(feats["negatives"][1])
    print(f"{args.arch}; {args.data_dir}: " + ", ".join(f"{s} {len(feats[s][1])}" for s in ("train", "valid", "test"))
          + f"; {args.negatives}: {n_neg} photos, halves chosen by seed: tuning / held-out")
    print("caught / rejected / acc-kept: held-out negatives called unknown, test species called unknown, top-1 on "
          f"test species accepted, at the threshold keeping {args.keep:.0%} of valid species; starred: at the "
          "threshold chosen with the tuning half. bytes: arrays stored (float16).\n")
    variants = {m: (m, {}) for m in cal.METHODS}
    variants.update({f"mahalanobis rank {r}": ("mahalanobis", {"max_rank": r}) for r in (0, 16, 256)})

    runs: dict[str, list[dict]] = {name: [] for name in variants}
    ece = []
    for seed in range(args.seeds):
        logits = train_head_logits(backbone, args.data_dir, feats, seed, args.cache_dir)
        order = np.random.default_rng(seed).permutation(n_neg)
        tune, held = order[: n_neg // 2], order[n_neg // 2:]
        rows = {name: figures(method, feats, logits, tune, held, args.keep, **options)
                for name, (method, options) in variants.items()}
        for name, row in rows.items():
            runs[name].append(row)
        yva, yte = feats["valid"][1], feats["test"][1]
        t = cal.fit_temperature(logits["valid"], yva)
        ece.append((t, cal.expected_calibration_error(cal.softmax(logits["test"]), yte),
                    cal.expected_calibration_error(cal.softmax(logits["test"], t), yte),
                    cal.nll(logits["test"], yte), cal.nll(logits["test"], yte, t), rows["msp"]["accuracy"]))
        if seed == 0:
            print(f"head seed 0, negative split seed 0 ({len(tune)} tuning / {len(held)} held-out); "
                  f"test top-1 {100 * rows['msp']['accuracy']:.0f}%")
            print_table(rows)
            print(f"  (threshold with negatives, {min(rows, key=lambda n: -rows[n]['AUROC'])}: "
                  f"{rows[min(rows, key=lambda n: -rows[n]['AUROC'])]['rule*']})\n")
    mean = {name: {c: statistics.mean(r[c] for r in rs) for c in COLUMNS} for name, rs in runs.items()}
    print(f"mean over {args.seeds} head seeds x negative splits")
    print_table(mean)
    best = max((n for n in cal.METHODS), key=lambda n: (mean[n]["caught"], mean[n]["AUROC"]))
    print(f"\nbest score by the validation-threshold figures: {best} (AUROC {mean[best]['AUROC']:.4f}, "
          f"{100 * mean[best]['caught']:.1f}% of held-out negatives caught, "
          f"{100 * mean[best]['rejected']:.1f}% of test species rejected)")
    print(f"\n{'seed':>4} {'T':>6} {'ECE before':>11} {'ECE after':>10} {'NLL before':>11} {'NLL after':>10} {'top-1':>6}")
    for seed, (t, before, after, nll_before, nll_after, acc) in enumerate(ece):
        print(f"{seed:>4} {t:>6.3f} {100 * before:>10.1f}% {100 * after:>9.1f}% {nll_before:>11.3f} "
              f"{nll_after:>10.3f} {100 * acc:>5.0f}%")
    cols = list(zip(*ece))
    print(f"mean {statistics.mean(cols[0]):>6.3f} {100 * statistics.mean(cols[1]):>10.1f}% "
          f"{100 * statistics.mean(cols[2]):>9.1f}% {statistics.mean(cols[3]):>11.3f} {statistics.mean(cols[4]):>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
