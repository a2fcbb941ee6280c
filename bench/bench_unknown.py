"""Which score tells "not one of my species" best, and which rule sets its threshold and the
temperature: issue 13's figures on real photos.

    python bench/bench_unknown.py ../shared/data/flower_photos_sample --negatives ../shared/data/not_flowers

Trains the head as `train.py` does (cached centre-crop features of the frozen backbone), then compares
two rules for each unknown score of `calibration`:
  valid-only   T and the threshold (keep 95%) from the 50 validation photos; a feature score's
               arrays from the training split (the rule before cross-fitting, and train.py's on a
               large valid split: `calibrating.valid_calibration`);
  cross-fitted T and the threshold from the train+valid photos, each scored by a fit on the other
               folds (`calibration.fit_calibration`, what train.py and `calibrate` do now); the
               arrays from all of train+valid.
The negatives (photos that are none of the species) are split in two halves with a fixed seed: the
"tuning" half may choose a threshold (starred columns), the "held-out" half is only ever scored.
Figures on the test split: AUROC of test species vs held-out negatives; held-out negatives caught,
test species wrongly called unknown, top-1 on the test species accepted; ECE (15 bins) before and
after each rule's temperature, with its noise floor (the ECE a perfectly calibrated model shows on
that few photos). Averaged over several head seeds and negative splits.

Flowers of species it was not trained on: `--leave_species_out` (with `--arrays_dir DIR` to keep and
reuse each run) trains train.py's default head on all species but one, each in turn, and prints per
candidate score the held-out species' photos caught, the held-out half of the negatives caught, the
known species' test photos kept and AUROC of each, at the cross-fitted keep-95% threshold:

    python bench/bench_unknown.py ../shared/data/flower_photos_2k --negatives ../shared/data/not_flowers \
        --leave_species_out --seeds 1 --arrays_dir /tmp/lso

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

from flower_classifier import calibration as cal, near_far, unknown as unk  # noqa: E402
from flower_classifier.calibrating import CalibrationData, cross_fitted_logits, valid_calibration  # noqa: E402
from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.checkpoint import load_checkpoint  # noqa: E402
from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.images import list_photos  # noqa: E402
from flower_classifier.feature_store import FeatureStore  # noqa: E402
from flower_classifier.features import cached_features  # noqa: E402
from flower_classifier.frozen_pass import centre_view, resolve_engine  # noqa: E402
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


def split_features(backbone, data_dir: Path, negatives_dir: Path, cache_dir, engine: str = "torch") -> dict[str, tuple]:
    """(features (N, D) float32 of the float16 cache, labels (N,), paths) per split, and the negatives
    (label -1); `engine` computes missing ones (train.py's own on the CPU: onnx)."""
    store = FeatureStore(cache_dir, backbone)
    train = FlowerFolder(split_dir(data_dir, "train"))
    folders = {"train": train, "valid": FlowerFolder(split_dir(data_dir, "valid"), classes=train.classes),
               "test": FlowerFolder(split_dir(data_dir, "test"), classes=train.classes)}
    samples = {name: folder.samples for name, folder in folders.items()}
    samples["negatives"] = [(p, -1) for p in list_photos(negatives_dir)]
    out = {}
    for name, pairs in samples.items():
        x, ok = cached_features(backbone, [p for p, _ in pairs], centre_view(backbone), store, progress=False,
                                engine=engine)
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
    if rule == "valid-only":  # train.py's own rule on a large valid split
        data = CalibrationData(feats["train"][:2], feats["valid"][:2], None if given is None else given[1])
        return valid_calibration(logits["valid"], data, method=method, keep=keep,
                                 negative_logits=None if given is None else given[0], **fit_options)
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


# ---------------------------------------------------------------- leave-species-out: flowers it was not trained on

def held_out_run(backbone, feats: dict, classes: list[str], held: int, seed: int, cache_dir) -> dict:
    """train.py's default head on every species but `held` (links to their train/valid photos), and what
    the scores need, as arrays: the known species' train+valid features `x`, labels `y`, folds and
    cross-fitted logits (as `calibrating.calibrate_head` makes them); the head's logits and the
    features of their test photos ("own"), of all photos of the held-out species ("near") and of the
    negatives ("far"); the threshold of train.py's own calibration."""
    known = [c for c in range(len(classes)) if c != held]
    index = np.full(len(classes), -1)
    index[known] = np.arange(len(known))
    part = {}
    for split in ("train", "valid", "test"):
        x, y, paths = feats[split]
        mine = y != held
        part[split] = (x[mine], index[y[mine]], [p for p, m in zip(paths, mine) if m])
    near = [feats[split][0][feats[split][1] == held] for split in ("train", "valid", "test")]
    part["near"] = (np.concatenate(near), None, None)
    part["far"] = feats["negatives"]
    with tempfile.TemporaryDirectory() as tmp:
        link_folder(Path(tmp), {split: [(p, classes[known[y]]) for p, y in zip(part[split][2], part[split][1])]
                                for split in ("train", "valid")})
        logits, ckpt = train_head_logits(backbone, Path(tmp), part, seed, cache_dir)
    crossed, y, fold, x = crossed_inputs(ckpt, part, len(known))
    # The head's weights and the train/valid boundary in x: for scores that need the head itself
    # (clipped features) or the valid-only rule (fit on train, threshold from valid).
    head = {f"head_{k}": v.float().numpy() for k, v in ckpt.head_state.items()}
    return {"x": x, "y": y, "fold": fold, "crossed": crossed, "own_y": part["test"][1],
            "today": np.array(ckpt.calibration.threshold), "n_train": np.array(len(part["train"][1])), **head,
            **{f"{name}_logits": logits[split] for name, split in (("own", "test"), ("near", "near"), ("far", "far"))},
            **{f"{name}_x": part[split][0] for name, split in (("own", "test"), ("near", "near"), ("far", "far"))}}


def crossfit(fit, score, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """(N,) scores of each photo from `fit` on the other folds (`calibration.cross_fitted_scores`, for
    any fit(x, dense labels) -> arrays and score(x, arrays))."""
    out = np.full(len(y), np.nan)
    inside = unk.covered(y, fold)
    for k in np.unique(fold):
        rest, held = fold != k, (fold == k) & inside
        _, dense = np.unique(y[rest], return_inverse=True)
        out[held] = score(x[held], fit(x[rest], dense))
    return out


def fit_relative(x: np.ndarray, y: np.ndarray) -> dict:
    """Relative Mahalanobis: the class Gaussians' arrays and one background Gaussian of all photos."""
    arrays = unk.fit_feature_arrays("mahalanobis", x, y)
    background = unk.fit_feature_arrays("mahalanobis", x, np.zeros(len(y), dtype=np.int64))
    return {**arrays, **{f"bg_{k}": v for k, v in background.items()}}


def relative_score(x: np.ndarray, arrays: dict) -> np.ndarray:
    """min over classes of d2(x, class) - d2(x, background) (squared Mahalanobis distances)."""
    d2 = _class_d2(x, arrays)
    d2_0 = _class_d2(x, {k[3:]: v for k, v in arrays.items() if k.startswith("bg_")})
    return d2.min(1) - d2_0[:, 0]


def _class_d2(x: np.ndarray, arrays: dict) -> np.ndarray:
    x = unk._unit(x).astype(np.float64)
    means, basis, variances, rest = arrays["means"], arrays["basis"], arrays["variances"], float(arrays["rest"])
    sq = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]
    proj = (x @ basis.T)[:, None, :] - (means @ basis.T)[None]
    return sq / rest + (proj ** 2 @ (1 / variances - 1 / rest))


def p_values(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The share of reference scores at or above each score, (1 + count) / (1 + n): small = unusual."""
    reference = np.sort(reference[np.isfinite(reference)])
    above = len(reference) - np.searchsorted(reference, scores, side="left")
    return (1 + above) / (1 + len(reference))


def loo_p_values(reference: np.ndarray) -> np.ndarray:
    """Each reference score's p-value against the others."""
    ranks = np.argsort(np.argsort(-reference, kind="stable"), kind="stable")  # 0 for the highest
    return (1 + ranks) / (1 + len(reference) - 1)


SETS = ("own", "near", "far")


def fit_principal(x: np.ndarray, y: np.ndarray, dims: int = 64) -> dict:
    """ViM's subspace: the mean of the unit features and their top `dims` principal directions (dims, D)."""
    z = unk._unit(x).astype(np.float64)
    mean = z.mean(0)
    _, vectors = unk._top_eigen(np.cov(z, rowvar=False), min(dims, z.shape[1] - 1))  # leave some residual
    return {"mean": mean, "basis": vectors.T}


def residual_norm(x: np.ndarray, arrays: dict) -> np.ndarray:
    """The length of the unit features' part (about the mean) outside the principal subspace."""
    z = unk._unit(x).astype(np.float64) - arrays["mean"]
    return np.linalg.norm(z - (z @ arrays["basis"].T) @ arrays["basis"], axis=1)


def fit_centred(x: np.ndarray, y: np.ndarray) -> dict:
    """kNN on unit features re-centred on the training mean and made unit again (the bank, k = 1)."""
    mean = unk._unit(x).mean(0)
    return {"mean": mean, "bank": unk._unit(unk._unit(x) - mean), "k": np.array(1)}


def centred_knn(x: np.ndarray, arrays: dict) -> np.ndarray:
    return unk.feature_score("knn", unk._unit(x) - arrays["mean"], arrays)


def z_sum(parts: list[dict], inside: np.ndarray) -> dict:
    """Each part in standard deviations of its cross-fitted scores, summed."""
    stats = [(p["crossed"][inside].mean(), p["crossed"][inside].std()) for p in parts]
    return {k: sum((p[k] - m) / s for p, (m, s) in zip(parts, stats)) for k in ("crossed", *SETS)}


def head_scores(a: dict) -> dict[str, dict[str, np.ndarray]]:
    """Scores that need the head itself, by train.py's valid-only rule: "crossed" holds the valid
    photos' scores under the head trained on the train photos (feature statistics from those too).
    ReAct (Sun et al. 2021): features clipped at a percentile of the training features, then energy;
    Mahalanobis on the head's hidden layer (after its ReLU)."""
    n = int(a["n_train"])
    given = {"crossed": a["x"][n:], **{s: a[f"{s}_x"] for s in SETS}}

    def forward(x, clip=np.inf):  # (N, D) -> (logits (N, C), hidden (N, H)); dropout is off at inference
        hidden = np.maximum(np.minimum(x, clip) @ a["head_0.weight"].T + a["head_0.bias"], 0)
        return hidden @ a["head_3.weight"].T + a["head_3.bias"], hidden

    out = {}
    for p in (90, 99):
        clip = np.percentile(a["x"][:n], p)
        out[f"react (clip at {p}th percentile)"] = {k: unk.logit_score("energy", forward(v, clip)[0])
                                                    for k, v in given.items()}
    # train.py's own rule on a large valid split: the valid photos' logits and features set the cuts
    valid_logits, (xt, yt), (xv, yv) = forward(a["x"][n:])[0], (a["x"][:n], a["y"][:n]), (a["x"][n:], a["y"][n:])
    t = cal.fit_temperature(valid_logits, yv)
    for share in (0.015, 0.02):
        arrays, crossed = near_far.fit_near_far_valid(valid_logits, (xt, yt), (xv, yv), t, far_share=share)
        out[f"near_far (valid-only, far share {share:.1%})"] = {"crossed": crossed, **{s: np.maximum(
            *near_far.near_far_parts(a[f"{s}_logits"], a[f"{s}_x"], t, arrays)) for s in SETS}}
    for method in ("mahalanobis", unk.SPECIES):
        arrays = unk.fit_feature_arrays(method, xt, yt)
        out[f"{method} (valid-only)"] = {k: unk.feature_score(method, v, arrays) for k, v in given.items()}
    arrays = unk.fit_feature_arrays("mahalanobis", forward(a["x"][:n])[1], a["y"][:n])
    out["mahalanobis on the head's hidden layer"] = {k: unk.feature_score("mahalanobis", forward(v)[1], arrays)
                                                     for k, v in given.items()}
    return out


def candidate_scores(a: dict) -> dict[str, dict[str, np.ndarray]]:
    """Every candidate's scores: "crossed" (the known species' train+valid photos, cross-fitted: what
    sets the threshold) and each of SETS, all higher = less like the known species."""
    x, y, fold = a["x"], a["y"], a["fold"]
    inside = unk.covered(y, fold)
    t = cal.fit_temperature(a["crossed"][inside], y[inside])
    out = {}
    for method in unk.LOGIT_METHODS:
        out[method] = {"crossed": unk.logit_score(method, a["crossed"], t),
                       **{s: unk.logit_score(method, a[f"{s}_logits"], t) for s in SETS}}
    package = {m: (lambda x, y, m=m: unk.fit_feature_arrays(m, x, y), lambda x, arr, m=m: unk.feature_score(m, x, arr))
               for m in ("mahalanobis", unk.SPECIES)}
    feature = {**package,
               "rel_mahalanobis": (fit_relative, relative_score),
               "cosine": (lambda x, y: unk.fit_feature_arrays("cosine", x, y),
                          lambda x, arr: unk.feature_score("cosine", x, arr))}
    for k in (1, 5):
        feature[f"knn{k}"] = (lambda x, y, k=k: unk.fit_feature_arrays("knn", x, y, k=k),
                              lambda x, arr: unk.feature_score("knn", x, arr))
    for name, (fit, score) in feature.items():
        arrays = fit(x, y)
        crossed = (unk.cross_fitted_scores(name, x, y, fold) if name in package  # the package's, faster
                   else crossfit(fit, score, x, y, fold))
        out[name] = {"crossed": crossed, **{s: score(a[f"{s}_x"], arrays) for s in SETS}}
    logits = {"crossed": a["crossed"], **{s: a[f"{s}_logits"] for s in SETS}}
    for base in ("energy", "max_logit", "margin"):
        # standardized by the predicted class's cross-fitted scores (what near_far's near part does)
        raw = {k: -np.diff(np.sort(v / t, 1)[:, -2:], axis=1)[:, 0] if base == "margin" else out[base][k]
               for k, v in logits.items()}
        centre, spread = near_far.standardization(raw["crossed"][inside], a["crossed"][inside].argmax(1),
                                             a["crossed"].shape[1])
        out[f"std_{base}"] = {k: (v - centre[logits[k].argmax(1)]) / spread[logits[k].argmax(1)] for k, v in raw.items()}
    for share in (0.01, 0.015, 0.02):
        arrays, crossed = near_far.fit_near_far(a["crossed"], y, fold, x, t, far_share=share,
                                           distance=out["mahalanobis"]["crossed"])
        full = np.full(len(y), np.nan)
        full[inside] = crossed
        parts = {s: near_far.near_far_parts(a[f"{s}_logits"], a[f"{s}_x"], t, arrays) for s in SETS}
        out[f"near_far (far share {share:.1%})"] = {"crossed": full, **{s: np.maximum(*parts[s]) for s in SETS},
                                                    "far_part": {s: parts[s][1] for s in SETS}}
    fit = {"vim": fit_principal, "knn1 centred": fit_centred}
    score = {"vim": residual_norm, "knn1 centred": centred_knn}
    for name in fit:
        arrays = fit[name](x, y)
        out[name] = {"crossed": crossfit(fit[name], score[name], x, y, fold),
                     **{s: score[name](a[f"{s}_x"], arrays) for s in SETS}}
    # ViM (Wang et al. 2022): the residual as a virtual logit, scaled to the mean top logit, beside the
    # real ones: alpha * residual + energy at T = 1.
    residual = out.pop("vim")
    alpha = a["crossed"][inside].max(1).mean() / residual["crossed"][inside].mean()
    out["vim (64 directions)"] = {k: alpha * v + unk.logit_score("energy", logits[k]) for k, v in residual.items()}
    for combo in (("energy", "knn1"), ("energy", "mahalanobis"), ("energy", "knn1 centred")):
        out[f"z-sum({'+'.join(combo)})"] = z_sum([out[c] for c in combo], inside)
    if "n_train" in a:  # arrays saved with the head
        out.update(head_scores(a))
    for combo in (("energy", "mahalanobis"), ("max_logit", "mahalanobis"), ("energy", "rel_mahalanobis"),
                  ("std_energy", "mahalanobis"), ("std_energy", "std_margin")):
        pc = [loo_p_values(out[c]["crossed"][inside]) for c in combo]
        ps = {s: [p_values(out[c]["crossed"][inside], out[c][s]) for c in combo] for s in SETS}
        for how, join in (("max", lambda ps: -np.log(np.min(ps, axis=0))),
                          ("fisher", lambda ps: -np.log(ps).sum(0))):
            crossed = np.full(len(y), np.nan)
            crossed[inside] = join(pc)
            out[f"{how}({'+'.join(combo)})"] = {"crossed": crossed, **{s: join(ps[s]) for s in SETS}}
    return out


def saved_scores(a: dict, path: Path | None) -> dict:
    """`candidate_scores(a)`, kept in `path` (flat "name|set" keys) and read back from it when it is
    there: delete it after changing the candidates."""
    if path is not None and path.is_file():
        out = {}
        for key, value in np.load(path).items():
            name, *where = key.split("|")
            slot = out.setdefault(name, {})
            for w in where[:-1]:
                slot = slot.setdefault(w, {})
            slot[where[-1]] = value
        return out
    out = candidate_scores(a)
    if path is not None:
        flat = {f"{name}|{k}": v for name, sc in out.items() for k, v in sc.items() if k != "far_part"}
        flat.update({f"{name}|far_part|{k}": v for name, sc in out.items() for k, v in sc.get("far_part", {}).items()})
        np.savez(path, **flat)
    return out


def leave_species_out(backbone, feats: dict, classes: list[str], seeds: int, keep: float, cache_dir,
                      arrays_dir: Path | None, held_out: list[int] | None = None) -> None:
    """Each species in turn held out of training: every candidate score's catch of it ("near"), of the
    held-out half of the negatives ("far") and its keep of the known species' test photos, at the
    threshold keeping `keep` of the cross-fitted train+valid photos; AUROC of each against "own"."""
    runs = []
    for held in held_out or range(len(classes)):
        for seed in range(seeds):
            path = arrays_dir / f"held{held}_seed{seed}.npz" if arrays_dir else None
            if path is not None and path.is_file():
                a = dict(np.load(path))
            else:
                a = held_out_run(backbone, feats, classes, held, seed, cache_dir)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(path, **a)
            runs.append((held, seed, a))
    n_far = len(feats["negatives"][1])
    rows = {}
    for held, seed, a in runs:
        tune, evaluate = negative_halves(n_far, seed)
        for name, sc in saved_scores(a, arrays_dir and arrays_dir / f"held{held}_seed{seed}_scores.npz").items():
            crossed = sc["crossed"][np.isfinite(sc["crossed"])]
            threshold, _ = unk.choose_threshold(crossed, keep=keep)
            tuned, _ = unk.choose_threshold(crossed, sc["far"][tune], keep=keep)
            far = sc["far"][evaluate]
            kinds = {}
            if "far_part" in sc:  # which kind the answer names: "not a flower" where the far part fires
                for s in ("near", "far"):
                    part, score = sc["far_part"][s], sc[s]
                    if s == "far":
                        part, score = part[evaluate], score[evaluate]
                    called = score > threshold
                    kinds[f"{s} as far"] = float((part[called] > threshold).mean()) if called.any() else float("nan")
            rows.setdefault(name, []).append({**kinds,
                "held": held, "near": float((sc["near"] > threshold).mean()), "far": float((far > threshold).mean()),
                "kept": float((sc["own"] <= threshold).mean()), "auroc_near": unk.auroc(sc["own"], sc["near"]),
                "auroc_far": unk.auroc(sc["own"], far), "near*": float((sc["near"] > tuned).mean()),
                "far*": float((far > tuned).mean()), "kept*": float((sc["own"] <= tuned).mean())})
    cols = ("near", "far", "kept", "auroc_near", "auroc_far", "near*", "far*", "kept*")
    print(f"\nleave-species-out: each of the {len(classes)} species held out of training in turn, {seeds} seed(s); "
          f"near: its photos called unknown; far: held-out half of the negatives called unknown; kept: the known "
          f"species' test photos kept; at the threshold keeping {keep:.0%} of the cross-fitted train+valid photos "
          f"(starred: chosen with the tuning half of the negatives too). Mean over held-out species:")
    print(f"{'score':<42}" + "".join(f"{c:>11}" for c in cols) + "  near AUROC per held-out species")
    held_out = sorted({r["held"] for rs in rows.values() for r in rs})
    for name, rs in rows.items():
        mean = {c: statistics.mean(r[c] for r in rs) for c in cols}
        per = [statistics.mean(r["auroc_near"] for r in rs if r["held"] == h) for h in held_out]
        print(f"{name:<42}" + "".join(f"{mean[c]:>11.3f}" if c.startswith("auroc") else f"{100 * mean[c]:>10.1f}%"
                                      for c in cols) + "  " + " ".join(f"{v:.3f}" for v in per))
    for name, rs in rows.items():
        if "near as far" not in rs[0]:
            continue
        print(f"\n{name}, per held-out species ({', '.join(classes[h] for h in held_out)}; mean over seeds):")
        for c in ("near", "far", "kept", "auroc_near", "auroc_far", "near as far", "far as far"):
            per = [statistics.mean(r[c] for r in rs if r["held"] == h) for h in held_out]
            print(f"  {c:<12}" + " ".join(f"{v:>7.3f}" if c.startswith("auroc") else f"{100 * v:>6.1f}%" for v in per))
    print("near as far / far as far: of the photos called unknown, the share answered \"not a flower\" (the far "
          "part above the threshold); the rest are answered \"a flower it was not trained on\"")


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
    p.add_argument("--leave_species_out", action="store_true",
                   help="only the leave-species-out study: each species held out of training in turn, scored as unknown")
    p.add_argument("--arrays_dir", type=Path, default=None,
                   help="--leave_species_out: keep each run's logits and features here and reuse them")
    p.add_argument("--per_seed", nargs="+", default=[], choices=cal.METHODS, metavar="SCORE",
                   help="also print each seed's figures for these scores (paired: the same heads and halves)")
    p.add_argument("--held_out", type=int, nargs="+", default=None,
                   help="--leave_species_out: only these species (0-based, in folder order; default all)")
    args = p.parse_args(argv)
    if args.leave_species_out:
        backbone = build_backbone(args.arch)
        feats = split_features(backbone, args.data_dir, args.negatives, args.cache_dir, resolve_engine("auto", "cpu"))
        classes = FlowerFolder(split_dir(args.data_dir, "train")).classes
        leave_species_out(backbone, feats, classes, args.seeds, args.keep, args.cache_dir, args.arrays_dir,
                          args.held_out)
        return 0
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
        for name in args.per_seed:
            print(f"  {name} per seed, AUROC / held-out negatives caught / all caught / test species rejected: "
                  + "; ".join(f"{r['AUROC']:.4f} {100 * r['caught']:.1f}% {100 * r['all']:.1f}% "
                              f"{100 * r['rejected']:.1f}%" for r in runs[rule][name]))

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
