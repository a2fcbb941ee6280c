"""Which score tells "not one of my species" best, and which rule sets its threshold and the
temperature: issue 13's figures on real photos.

    python bench/bench_unknown.py ../shared/data/flower_photos_sample --negatives ../shared/data/not_flowers

Trains the head as `train.py` does (cached centre-crop features of the frozen backbone), then compares
two rules for each unknown score of `calibration`:
  valid-only   T and the threshold (keep 95%) from the 50 validation photos; a feature score's
               arrays from the training split (the rule before cross-fitting);
  cross-fitted T and the threshold from the train+valid photos, each scored by a fit on the other
               folds (`calibration.fit_calibration`, what train.py and `calibrate` do now); the
               arrays from all of train+valid.
The negatives (photos that are none of the species) are split in two halves with a fixed seed: the
"tuning" half may choose a threshold (starred columns), the "held-out" half is only ever scored.
Figures on the test split: AUROC of test species vs held-out negatives; held-out negatives caught,
test species wrongly called unknown, top-1 on the test species accepted; ECE (15 bins) before and
after each rule's temperature, with its noise floor (the ECE a perfectly calibrated model shows on
that few photos). Averaged over several head seeds and negative splits.

The rule was chosen without the test split: `--resplits N` deals the 250 train+valid photos anew N
times into 150 train / 50 valid / 50 "test", runs train.py's training (which calibrates by the
cross-fitted rule) on each, and scores both rules on each pseudo-test; ECE is pooled over all of them
(N x 50 photos), where its noise floor is low enough to tell the rules apart.
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

from flower_classifier import calibration as cal, unknown as unk  # noqa: E402
from flower_classifier.calibrating import cross_fitted_logits  # noqa: E402
from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.checkpoint import load_checkpoint  # noqa: E402
from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.images import list_photos  # noqa: E402
from flower_classifier.features import FeatureStore, cached_features, centre_view  # noqa: E402
from flower_classifier.model import build_head  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402

COLUMNS = ("AUROC", "caught", "all", "rejected", "acc-kept", "caught*", "rejected*", "acc-kept*", "bytes")
RULES = ("valid-only", "cross-fitted")


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


def train_head_logits(backbone, data_dir: Path, feats: dict, seed: int, cache_dir) -> tuple[dict, object]:
    """Logits of every split under the head `train.py --arch ... --seed seed` keeps (its best epoch),
    and its checkpoint (calibrated by train.py's rule)."""
    config = TrainConfig(arch=backbone.name, seed=seed, num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(config, data_dir, save_dir=tmp, backbone=backbone, cache_dir=cache_dir,
                              progress=False, log=lambda m: None)
        ckpt = load_checkpoint(result.best_path)
    head = build_head(backbone.feature_dim, ckpt.config.hidden_units, len(ckpt.classes), ckpt.config.dropout)
    head.load_state_dict(ckpt.head_state)
    with torch.inference_mode():
        return {name: head.eval()(torch.from_numpy(x)).numpy() for name, (x, *_) in feats.items()}, ckpt


def valid_only(method: str, train: tuple, valid: tuple, valid_logits: np.ndarray, keep: float,
               negatives: tuple | None = None, max_rank: int = cal.MAX_RANK) -> cal.Calibration:
    """The rule before cross-fitting: T and the threshold from the validation photos alone, a feature
    score's arrays from the training split. `negatives`: their (logits, features)."""
    arrays = cal.fit_feature_arrays(method, *train, max_rank=max_rank) if method in cal.FEATURE_METHODS else {}
    c = cal.Calibration(cal.fit_temperature(valid_logits, valid[1]), method, arrays=arrays)
    c.threshold, c.rule = cal.choose_threshold(c.scores(valid_logits, valid[0]),
                                               None if negatives is None else c.scores(*negatives), keep=keep)
    return c


def crossed_inputs(ckpt, feats: dict, num_classes: int) -> tuple:
    """(logits, labels, fold, features) of the train+valid photos as `calibrating.calibrate_head` makes them."""
    x = np.concatenate([feats["train"][0], feats["valid"][0]])
    y = np.concatenate([feats["train"][1], feats["valid"][1]]).astype(np.int64)
    fold = unk.stratified_folds(y, unk.CROSS_FOLDS, seed=ckpt.config.seed)
    return cross_fitted_logits(ckpt.config, ckpt.epoch or ckpt.config.epochs, x, y, num_classes, fold), y, fold, x


def fit_rule(rule: str, method: str, feats: dict, logits: dict, crossed: tuple, keep: float,
             negatives: np.ndarray | None = None, **fit_options) -> cal.Calibration:
    """`rule`'s calibration for `method`; `negatives`: indices of the negatives that may choose the threshold."""
    xneg = feats["negatives"][0]
    given = None if negatives is None else (logits["negatives"][negatives], xneg[negatives])
    if rule == "valid-only":
        return valid_only(method, feats["train"][:2], feats["valid"][:2], logits["valid"], keep, given, **fit_options)
    xl, y, fold, x = crossed
    extra = {} if given is None else dict(negative_logits=given[0], negative_features=given[1])
    return cal.fit_calibration(xl, y, fold, method=method, features=x, keep=keep, **extra, **fit_options)


def figures(rule: str, method: str, feats: dict, logits: dict, crossed: tuple, tune: np.ndarray,
            held: np.ndarray, keep: float, **fit_options) -> dict[str, float]:
    (xte, yte, _), (xneg, *_) = feats["test"], feats["negatives"]
    plain = fit_rule(rule, method, feats, logits, crossed, keep, **fit_options)
    tuned = fit_rule(rule, method, feats, logits, crossed, keep, tune, **fit_options)
    species = plain.scores(logits["test"], xte)
    negatives = plain.scores(logits["negatives"][held], xneg[held])
    correct = logits["test"].argmax(1) == yte
    a = unk.detection_metrics(species, correct, negatives, plain.threshold)
    b = unk.detection_metrics(species, correct, negatives, tuned.threshold)
    everyone = plain.scores(logits["negatives"], xneg)  # no negative chose the threshold without them
    return {"AUROC": a["auroc"], "caught": a["negatives_caught"], "all": float((everyone > plain.threshold).mean()),
            "rejected": a["species_rejected"],
            "acc-kept": a["accepted_accuracy"], "caught*": b["negatives_caught"],
            "rejected*": b["species_rejected"], "acc-kept*": b["accepted_accuracy"],
            "bytes": plain.storage_bytes(), "accuracy": a["accuracy"], "rule*": tuned.rule,
            "T": plain.temperature, "threshold": plain.threshold}


def link_folder(root: Path, photos: dict[str, list[tuple[Path, str]]]) -> Path:
    """root/split/class/i.ext: links to the photos (their bytes, so the feature cache serves them)."""
    for split, items in photos.items():
        for i, (path, category) in enumerate(items):
            link = root / split / category / f"{i}{path.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).resolve())
    return root


def resplit_study(backbone, feats: dict, classes: list[str], count: int, keep: float, cache_dir) -> None:
    """Both rules on `count` fresh deals of the train+valid photos into 150 train / 50 valid / 50
    pseudo-test (10/10 per class where classes allow; the test split is never used)."""
    x = np.concatenate([feats[s][0] for s in ("train", "valid")])
    y = np.concatenate([feats[s][1] for s in ("train", "valid")])
    paths = [p for s in ("train", "valid") for p in feats[s][2]]
    xneg = feats["negatives"][0]
    rates = {rule: [] for rule in RULES}
    probs = {name: [] for name in ("none", *RULES)}
    temperatures = {name: [] for name in ("none", *RULES)}
    labels = []
    for r in range(count):
        rng = np.random.default_rng(1000 + r)
        split = np.zeros(len(y), dtype=int)  # 0 train, 1 valid, 2 pseudo-test
        for c in np.unique(y):
            where = rng.permutation(np.flatnonzero(y == c))
            n = len(where) // 5
            split[where[:n]], split[where[n:2 * n]] = 2, 1
        part = {name: (x[split == k], y[split == k], [paths[i] for i in np.flatnonzero(split == k)])
                for k, name in enumerate(("train", "valid", "test"))}
        part["negatives"] = feats["negatives"]
        with tempfile.TemporaryDirectory() as tmp:
            link_folder(Path(tmp), {name: [(paths[i], classes[y[i]]) for i in np.flatnonzero(split == k)]
                                    for k, name in enumerate(("train", "valid"))})
            logits, ckpt = train_head_logits(backbone, Path(tmp), part, r, cache_dir)
        crossed = crossed_inputs(ckpt, part, len(classes))
        for rule in RULES:
            c = fit_rule(rule, "mahalanobis", part, logits, crossed, keep)
            rates[rule].append((float((c.scores(None, part["test"][0]) > c.threshold).mean()),
                                float((c.scores(None, xneg) > c.threshold).mean())))
            probs[rule].append(c.probabilities(logits["test"]))
            temperatures[rule].append(c.temperature)
        probs["none"].append(cal.softmax(logits["test"]))
        temperatures["none"].append(1.0)
        labels.append(part["test"][1])
    y_all = np.concatenate(labels)
    print(f"\nchoosing the rule without the test split: {count} deals of the {len(y)} train+valid photos into "
          f"{int((split == 0).sum())} train / {int((split == 1).sum())} valid / {int((split == 2).sum())} pseudo-test, "
          f"train.py's head on each; mahalanobis, keep {keep:.0%}")
    print(f"{'rule':<14}{'species rejected':>18}{'rms off 5%':>12}{'non-flowers caught':>20}{'lowest':>8}"
          f"{'pooled ECE':>12}{'floor':>7}{'NLL':>7}{'T (sd)':>14}")
    for name in ("none", *RULES):
        p = np.concatenate(probs[name])
        ts = temperatures[name]
        nll = -np.log(p[np.arange(len(y_all)), y_all]).mean()
        ece = (f"{100 * cal.expected_calibration_error(p, y_all):>11.1f}%"
               f"{100 * cal.ece_noise_floor(p, draws=200):>6.1f}%{nll:>7.3f}"
               f"{statistics.mean(ts):>8.3f} ({statistics.pstdev(ts):.3f})")
        if name == "none":
            print(f"{'no T':<14}{'':>18}{'':>12}{'':>20}{'':>8}{ece}")
            continue
        rej, caught = np.array(rates[name]).T
        print(f"{name:<14}{100 * rej.mean():>17.1f}%{100 * np.sqrt(((rej - (1 - keep)) ** 2).mean()):>11.1f}%"
              f"{100 * caught.mean():>19.1f}%{100 * caught.min():>7.1f}%{ece}")


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
    p.add_argument("--keep", type=float, default=cal.KEEP, help="share of species photos kept (default 0.95)")
    p.add_argument("--seeds", type=int, default=5, help="head seeds and negative splits to average (default 5)")
    p.add_argument("--resplits", type=int, default=20,
                   help="fresh deals of train+valid to compare the rules on, without the test split (default 20)")
    p.add_argument("--cache_dir", default=None, help="feature cache (default: $FLOWER_CLASSIFIER_CACHE or ~/.cache)")
    p.add_argument("--write_halves", type=Path, default=None, metavar="DIR",
                   help="only write DIR/tuning and DIR/held_out (links to seed 0's halves of --negatives) and stop")
    args = p.parse_args(argv)
    if args.write_halves:
        write_halves(args.negatives, args.write_halves)
        return 0

    backbone = build_backbone(args.arch)
    feats = split_features(backbone, args.data_dir, args.negatives, args.cache_dir)
    classes = FlowerFolder(split_dir(args.data_dir, "train")).classes
    n_neg = len(feats["negatives"][1])
    print(f"{args.arch}; {args.data_dir}: " + ", ".join(f"{s} {len(feats[s][1])}" for s in ("train", "valid", "test"))
          + f"; {args.negatives}: {n_neg} photos, halves chosen by seed: tuning / held-out")
    print("caught / all / rejected / acc-kept: held-out negatives called unknown (all: of all negatives, none of "
          "which chose this threshold), test species called unknown, top-1 on test species accepted, at the "
          f"threshold keeping {args.keep:.0%} of the rule's species photos; starred: at the threshold chosen with "
          "the tuning half too. AUROC: test species vs held-out negatives. bytes: arrays stored (float16; base64 "
          "in JSON +33%).")
    variants = {m: (m, {}) for m in cal.METHODS}
    variants.update({f"mahalanobis rank {r}": ("mahalanobis", {"max_rank": r}) for r in (0, 16, 256)})

    runs = {rule: {name: [] for name in variants} for rule in RULES}
    ece, rules = [], {}
    yte = feats["test"][1]
    for seed in range(args.seeds):
        logits, ckpt = train_head_logits(backbone, args.data_dir, feats, seed, args.cache_dir)
        crossed = crossed_inputs(ckpt, feats, len(classes))
        tune, held = negative_halves(n_neg, seed)
        for rule in RULES:
            for name, (method, options) in variants.items():
                row = figures(rule, method, feats, logits, crossed, tune, held, args.keep, **options)
                runs[rule][name].append(row)
                if seed == 0:
                    rules[rule, name] = row["rule*"]
        if seed == 0:  # the same rule, on the features and photo order of train.py's own loaders
            print(f"seed 0: train.py's own calibration: {ckpt.calibration.summary()}; this bench's cross-fitted "
                  f"mahalanobis threshold {runs['cross-fitted']['mahalanobis'][-1]['threshold']:.4g}")
        t_valid, t_crossed = (runs[rule]["msp"][-1]["T"] for rule in RULES)
        before = cal.softmax(logits["test"])
        ece.append((t_valid, t_crossed, cal.expected_calibration_error(before, yte),
                    cal.expected_calibration_error(cal.softmax(logits["test"], t_valid), yte),
                    cal.expected_calibration_error(cal.softmax(logits["test"], t_crossed), yte),
                    cal.ece_noise_floor(before), cal.nll(logits["test"], yte), cal.nll(logits["test"], yte, t_valid),
                    cal.nll(logits["test"], yte, t_crossed), runs[RULES[0]]["msp"][-1]["accuracy"]))
    for rule in RULES:
        mean = {name: {c: statistics.mean(r[c] for r in rs) for c in COLUMNS} for name, rs in runs[rule].items()}
        print(f"\n{rule} rule: mean over {args.seeds} head seeds x negative splits")
        print_table(mean)
        goals = [n for n in cal.METHODS if mean[n]["all"] >= 0.95 and mean[n]["AUROC"] >= 0.99]
        print(f"meeting both goals (>= 95% of negatives caught, AUROC >= 0.99): {', '.join(goals) or 'none'}; "
              f"test species rejected by mahalanobis per seed: "
              + " ".join(f"{100 * r['rejected']:.0f}%" for r in runs[rule]["mahalanobis"]))
        for name in goals:
            print(f"  {name}, threshold with the tuning half (seed 0): {rules[rule, name]}")

    print(f"\ntest split ({len(yte)} photos); T by each rule; floor: the ECE a perfectly calibrated model with the "
          f"same confidences shows on this many photos")
    print(f"{'seed':>4} {'T valid':>8} {'T cross':>8} {'ECE no T':>9} {'valid T':>8} {'cross T':>8} {'floor':>6} "
          f"{'NLL no T':>9} {'valid T':>8} {'cross T':>8} {'top-1':>6}")
    row = "{:>8.3f} {:>8.3f} {:>8.1f}% {:>7.1f}% {:>7.1f}% {:>5.1f}% {:>9.3f} {:>8.3f} {:>8.3f} {:>5.0f}%"
    for seed, e in enumerate(ece):
        print(f"{seed:>4} " + row.format(e[0], e[1], *(100 * v for v in e[2:6]), *e[6:9], 100 * e[9]))
    m = [statistics.mean(col) for col in zip(*ece)]
    print("mean " + row.format(m[0], m[1], *(100 * v for v in m[2:6]), *m[6:9], 100 * m[9]))

    if args.resplits:
        resplit_study(backbone, feats, classes, args.resplits, args.keep, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
