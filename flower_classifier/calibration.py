"""Probabilities that mean what they say, and "not one of my species": numpy and scipy only, so the
PyTorch checkpoint and the torch-free ONNX app share this one implementation.

Temperature scaling: one scalar T, fitted by minimising the negative log-likelihood of cross-fitted
logits; the probabilities shown are softmax(logits / T). Expected calibration error (ECE) over
equal-width confidence bins measures how far "80%" is from "right 8 times in 10".

Unknown scores: higher means less like the training species. From the logits: 1 - maximum softmax
probability ("msp"), energy (-T logsumexp(logits / T)), minus the largest logit ("max_logit"). From
the backbone's features: Mahalanobis distance to the nearest class mean under one shared, shrunk
covariance ("mahalanobis"), cosine distance to the nearest class mean ("cosine") or to the k-th
nearest training photo ("knn"). A photo is unknown when its score is above the threshold.

Cross-fitting (`fit_calibration`): the species photos of train and valid are dealt into CROSS_FOLDS
folds, and each photo is scored (logits and unknown score) by a fit on the other folds alone, so every
one of them scores as an unseen photo would. T and the threshold (keep 95% of those scores; and, when
given, a folder of photos that are none of the species) come from all of them, not from the 50 of a
small validation split, whose quantile and temperature swing from split to split (measured: README,
"Unknown photos and calibrated probabilities"). A feature score's arrays are then fitted on all of
train and valid.

`Calibration` holds all that prediction needs (T, method, threshold, the score's arrays) as plain
data: `to_dict` gives JSON-ready values (arrays as base64 float16), `from_dict` checks every field.
"""
from __future__ import annotations

import base64
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp
from scipy.stats import rankdata

from .config import KEEP, UNKNOWN_SCORES as METHODS  # KEEP: default share of species photos kept
from .errors import UserError

LOGIT_METHODS, FEATURE_METHODS = METHODS[:3], METHODS[3:]
ECE_BINS = 15
MAX_RANK = 64  # covariance directions kept for Mahalanobis; the rest share one variance
KNN_K = 5
TEMPERATURE_RANGE = (0.05, 20.0)
STORE_DTYPE = np.float16  # arrays as stored (the feature cache's own precision); computed in float32
FORMAT_VERSION = 1
CROSS_FOLDS = 5  # folds of the cross-fitting: each fit sees 80% of the species photos (measured as good as 10)


# ---------------------------------------------------------------- temperature and calibration error

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) probabilities of softmax(logits / temperature)."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the NLL of (logits (N, C), labels (N,)).

    The NLL is convex in 1/T, so a bounded scalar search over log T finds the one minimum; the bounds
    only bite when no photo is wrong (the NLL then keeps falling as T -> 0).
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise UserError("fitting a temperature needs at least one species photo")
    lo, hi = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


@dataclass
class Reliability:
    """Equal-width confidence bins: what a reliability diagram draws and ECE sums."""

    edges: np.ndarray  # (B + 1,) from 0 to 1
    counts: np.ndarray  # (B,) photos whose top probability falls in the bin
    confidence: np.ndarray  # (B,) their mean top probability (0 where empty)
    accuracy: np.ndarray  # (B,) the share of them predicted right (0 where empty)

    @property
    def ece(self) -> float:
        """Sum over bins of (share of photos) x |accuracy - confidence|."""
        total = self.counts.sum()
        return float(np.abs(self.accuracy - self.confidence) @ self.counts / total) if total else 0.0


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi], the first one [0, hi]: a confidence of exactly 1 lands in the top bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    seen = np.maximum(counts, 1)
    return Reliability(edges, counts, np.bincount(which, confidence, bins) / seen,
                       np.bincount(which, correct.astype(float), bins) / seen)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probabilities, labels, bins).ece


def ece_noise_floor(probabilities: np.ndarray, bins: int = ECE_BINS, draws: int = 1000, seed: int = 0) -> float:
    """The mean ECE a perfectly calibrated model with these confidences shows on this many photos
    (each right with the probability it states): on 50 photos about 10%, so a smaller ECE cannot be
    told from chance there."""
    probabilities = np.asarray(probabilities)
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    rng = np.random.default_rng(seed)
    return float(np.mean([reliability(probabilities, np.where(rng.random(len(confidence)) < confidence,
                                                               predicted, -1), bins).ece for _ in range(draws)]))


# ---------------------------------------------------------------- unknown scores (higher = less known)

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)  # float32 squares overflow for features past ~1e19
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def logit_score(method: str, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N,) scores by "msp", "energy" or "max_logit"."""
    logits = np.asarray(logits, dtype=np.float64)
    if method == "msp":
        return 1.0 - softmax(logits, temperature).max(1)
    if method == "energy":
        return -temperature * logsumexp(logits / temperature, axis=1)
    if method == "max_logit":
        return -logits.max(1)
    raise ValueError(f"not a logit score: {method}")


def fit_feature_arrays(method: str, features: np.ndarray, labels: np.ndarray, *,
                       max_rank: int = MAX_RANK, k: int = KNN_K) -> dict[str, np.ndarray]:
    """What a feature score needs, from the training split's features (N, D) and labels (N,).

    All on unit-length features. mahalanobis: class means (C, D); the shared within-class covariance,
    shrunk towards a multiple of the identity by the Ledoit-Wolf rule, kept as its top `max_rank`
    directions (R, D) with their variances (R,) and one variance for all other directions ("rest").
    cosine: unit class means (C, D). knn: the unit training features (N, D) and k. Rounded to
    STORE_DTYPE, as stored.
    """
    # On the unit sphere: what a photo shows lies in its features' direction more than in their length
    # (measured on the sample: Mahalanobis AUROC 0.85 on raw features, 0.99 on unit ones).
    if features is None or labels is None:
        raise ValueError(f"the {method} score needs the training split's features and labels")
    x, labels = _unit(features).astype(np.float64), np.asarray(labels)
    classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=classes)
    if (counts == 0).any():
        raise UserError(f"class {int(np.argmin(counts))} has no training features to describe it")
    means = np.zeros((classes, x.shape[1]))
    np.add.at(means, labels, x)
    means /= counts[:, None]
    if method == "cosine":
        arrays = {"directions": _unit(means)}
    elif method == "knn":
        arrays = {"bank": x, "k": np.array(min(k, len(x)))}
    elif method == "mahalanobis":
        arrays = {"means": means, **_shrunk_covariance(x - means[labels], max_rank)}
    else:
        raise ValueError(f"not a feature score: {method}")
    return {name: a if a.dtype.kind == "i" else a.astype(STORE_DTYPE).astype(np.float32)
            for name, a in arrays.items()}


def _shrunk_covariance(residuals: np.ndarray, max_rank: int) -> dict[str, np.ndarray]:
    n, d = residuals.shape
    _, s, vt = np.linalg.svd(residuals, full_matrices=False)  # residuals = U diag(s) Vt
    eig = s ** 2 / n  # eigenvalues of the covariance, largest first (at most min(N, D) nonzero)
    mu = eig.sum() / d  # the identity target's scale: the mean variance
    # Ledoit-Wolf: the shrinkage that minimises the expected squared error to the true covariance.
    spread = (eig ** 2).sum() - d * mu ** 2  # |S - mu I|^2
    noise = ((np.linalg.norm(residuals, axis=1) ** 4).sum() / n - (eig ** 2).sum()) / n
    shrink = 1.0 if spread <= 0 else min(max(noise, 0.0) / spread, 1.0)
    rank = min(max_rank, len(eig))
    kept = (1 - shrink) * eig[:rank] + shrink * mu
    rest = (1 - shrink) * eig[rank:].sum() / max(d - rank, 1) + shrink * mu
    # No shrinkage and no variance left (N <= R, or one photo per class): keep it invertible, also once
    # stored as float16 (whose smallest positive value is 6e-8).
    rest = max(rest, 1e-6 * mu, 1e-7)
    return {"basis": vt[:rank], "variances": np.maximum(kept, rest), "rest": np.array(rest)}


def feature_score(method: str, features: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(N, D) features -> (N,) scores by "mahalanobis", "cosine" or "knn" (see `fit_feature_arrays`)."""
    x = _unit(features).astype(np.float64 if method == "mahalanobis" else np.float32)
    if method == "cosine":
        return 1.0 - (x @ arrays["directions"].T).max(1)
    if method == "knn":
        similarity = x @ arrays["bank"].T  # (N, M)
        k = int(arrays["k"])
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]
    if method == "mahalanobis":
        means, basis, variances, rest = arrays["means"], arrays["basis"], arrays["variances"], float(arrays["rest"])
        # |x - m|^2 / rest, corrected along the kept directions: (x-m)' P (x-m) without a (D, D) matrix.
        sq = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]  # (N, C)
        proj = (x @ basis.T)[:, None, :] - (means @ basis.T)[None]  # (N, C, R)
        d2 = sq / rest + (proj ** 2 @ (1 / variances - 1 / rest))
        return np.sqrt(np.maximum(d2.min(1), 0.0))
    raise ValueError(f"not a feature score: {method}")


# ---------------------------------------------------------------- thresholds and how well they work

def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """The chance that an unknown photo scores above a known one (ties count half): Mann-Whitney U."""
    known, unknown = np.ravel(known_scores), np.ravel(unknown_scores)
    if len(known) == 0 or len(unknown) == 0:
        raise ValueError("AUROC needs scores of both kinds")
    ranks = rankdata(np.concatenate([known, unknown]))  # ties get their average rank
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def choose_threshold(species_scores: np.ndarray, negative_scores: np.ndarray | None = None, *,
                     keep: float = KEEP, of: str = "validation photos") -> tuple[float, str]:
    """The threshold (unknown: score > threshold) and a sentence saying how it was chosen; `of` names
    the species photos `species_scores` belong to.

    Species photos only: the lowest threshold keeping at least `keep` of them.
    With negatives (photos that are none of the species): among thresholds still keeping at least
    `keep` of them, the one with the best balanced accuracy (mean of species kept and negatives
    caught), in the middle of the gap between the two kinds when several tie; so a clean separation
    puts it half-way between them rather than at the edge of the species photos.
    """
    valid = np.sort(np.ravel(species_scores))
    if not 0 < keep <= 1 or len(valid) == 0:
        raise UserError(f"choosing a threshold needs species photos and 0 < keep <= 1 (got {keep})")
    lowest = float(valid[max(math.ceil(keep * len(valid)) - 1, 0)])
    if negative_scores is None or len(negative_scores) == 0:
        kept = float((valid <= lowest).mean())
        return lowest, f"keeps {kept:.0%} of {len(valid)} {of} (at least {keep:.0%})"
    negative = np.ravel(negative_scores)
    values = np.unique(np.concatenate([valid, negative]))
    candidates = np.concatenate([(values[:-1] + values[1:]) / 2, values[-1:]])
    candidates = candidates[candidates >= lowest]
    kept = (valid[None, :] <= candidates[:, None]).mean(1)
    caught = (negative[None, :] > candidates[:, None]).mean(1)
    balanced = (kept + caught) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    i = int(best[len(best) // 2])
    return float(candidates[i]), (f"keeps {kept[i]:.0%} of {len(valid)} {of} and catches "
                                  f"{caught[i]:.0%} of {len(negative)} negatives (best balanced accuracy "
                                  f"while keeping at least {keep:.0%})")


def detection_metrics(species_scores: np.ndarray, species_correct: np.ndarray, negative_scores: np.ndarray,
                      threshold: float) -> dict[str, float]:
    """What `evaluate --negatives` prints: AUROC, the share of negatives caught, of species photos
    wrongly called unknown, and top-1 accuracy on the species photos accepted."""
    species, correct = np.ravel(species_scores), np.ravel(species_correct).astype(bool)
    accepted = species <= threshold
    return {"auroc": auroc(species, negative_scores),
            "negatives_caught": float((np.ravel(negative_scores) > threshold).mean()),
            "species_rejected": float((~accepted).mean()),
            "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else float("nan"),
            "accuracy": float(correct.mean())}


# ---------------------------------------------------------------- what a checkpoint and an ONNX file carry

@dataclass
class Assessment:
    probabilities: np.ndarray  # (N, C) softmax(logits / T)
    scores: np.ndarray  # (N,) higher = less like the training species
    unknown: np.ndarray  # (N,) bool: score above the threshold


@dataclass
class Calibration:
    """Temperature, unknown score and threshold: all that prediction needs, as plain data."""

    temperature: float = 1.0
    method: str = "msp"
    threshold: float = 1.0  # unknown when the score is above it
    rule: str = ""  # how the threshold was chosen, in words
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # what a feature score needs

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def scores(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        if self.needs_features:
            if features is None:
                raise ValueError(f"the {self.method} score needs the backbone's features")
            return feature_score(self.method, features, self.arrays)
        return logit_score(self.method, logits, self.temperature)

    def assess(self, logits: np.ndarray, features: np.ndarray | None = None) -> Assessment:
        """The one call both backends make per batch: logits (N, C), features (N, D) -> Assessment."""
        scores = self.scores(logits, features)
        return Assessment(self.probabilities(logits), scores, scores > self.threshold)

    def summary(self) -> str:
        """One line for train.py and `calibrate` to say what they chose."""
        return (f"temperature {self.temperature:.3f}; unknown when the {self.method} score is above "
                f"{self.threshold:.4g}" + (f": {self.rule}" if self.rule else ""))

    def storage_bytes(self) -> int:
        return sum(a.size * (2 if a.dtype.kind == "f" else 4) for a in self.arrays.values())

    def to_dict(self) -> dict:
        """JSON-ready: for the checkpoint as it is, for ONNX metadata as json.dumps of it."""
        return {"version": FORMAT_VERSION, "temperature": float(self.temperature), "method": self.method,
                "threshold": float(self.threshold), "rule": self.rule,
                "arrays": {name: _encode(a) for name, a in self.arrays.items()}}

    @classmethod
    def from_dict(cls, d, *, where: str = "calibration", num_classes: int | None = None,
                  feature_dim: int | None = None) -> "Calibration":
        """Checked field by field; a damaged one is a UserError naming `where` and the field.
        `num_classes` and `feature_dim`, when given, must match the model's."""
        def fail(name: str, what: str):
            raise UserError(f"{where}: calibration field '{name}' {what}; recalibrate with "
                            f"`python -m flower_classifier calibrate`")

        if not isinstance(d, dict):
            fail("(all)", f"must be a dict (got {type(d).__name__})")
        version = d.get("version")
        if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
            fail("version", f"must be an integer from 1 to {FORMAT_VERSION} (got {version!r})")
        for name in ("temperature", "threshold"):
            if not _is_real(d.get(name)) or not math.isfinite(d[name]):
                fail(name, f"must be a finite number (got {d.get(name)!r})")
        if not TEMPERATURE_RANGE[0] / 2 <= d["temperature"] <= TEMPERATURE_RANGE[1] * 2:
            fail("temperature", f"must be within {TEMPERATURE_RANGE} (got {d['temperature']!r})")
        if d.get("method") not in METHODS:
            fail("method", f"must be one of {', '.join(METHODS)} (got {d.get('method')!r})")
        if not isinstance(d.get("rule", ""), str):
            fail("rule", "must be a string")
        raw = d.get("arrays", {})
        if not isinstance(raw, dict) or set(raw) != set(_SHAPES.get(d["method"], {})):
            fail("arrays", f"must hold exactly {sorted(_SHAPES.get(d['method'], {})) or 'nothing'} for "
                           f"{d['method']} (got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__})")
        arrays = {}
        for name, value in raw.items():
            try:
                arrays[name] = _decode(value)
            except (TypeError, ValueError, KeyError) as e:
                fail(f"arrays.{name}", f"is damaged ({e})")
        sizes = {"C": num_classes, "D": feature_dim}  # letters the shapes below name; None: not yet known
        for name, letters in _SHAPES.get(d["method"], {}).items():
            shape = arrays[name].shape
            if len(shape) != len(letters):
                fail(f"arrays.{name}", f"must have {len(letters)} dimensions (got shape {list(shape)})")
            for letter, n in zip(letters, shape):
                if sizes.get(letter) is None:
                    sizes[letter] = n
                elif sizes[letter] != n:
                    fail(f"arrays.{name}", f"has shape {list(shape)}, which disagrees with {letter} = "
                                           f"{sizes[letter]} (the model's or another array's)")
            if arrays[name].dtype.kind == "f" and (shape and min(shape) == 0):
                fail(f"arrays.{name}", "is empty")
        positive = [n for n in ("variances", "rest", "k") if n in arrays and not (arrays[n] > 0).all()]
        if positive:
            fail(f"arrays.{positive[0]}", "must be positive")
        if "k" in arrays and int(arrays["k"]) > len(arrays["bank"]):
            fail("arrays.k", f"must be at most the {len(arrays['bank'])} stored photos")
        return cls(float(d["temperature"]), d["method"], float(d["threshold"]), d.get("rule", ""), arrays)


# The dimensions of each method's arrays: C classes, D feature size, R kept directions, M stored photos.
_SHAPES = {"mahalanobis": {"means": "CD", "basis": "RD", "variances": "R", "rest": ""},
           "cosine": {"directions": "CD"}, "knn": {"bank": "MD", "k": ""}}
_DTYPES = {"float16": np.float16, "int32": np.int32}


def _encode(array: np.ndarray) -> dict:
    dtype = "int32" if array.dtype.kind == "i" else "float16"
    data = np.ascontiguousarray(array, dtype=_DTYPES[dtype]).astype(f"<{np.dtype(_DTYPES[dtype]).str[1:]}")
    return {"dtype": dtype, "shape": list(array.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode(value: dict) -> np.ndarray:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of dtype, shape and data, got {type(value).__name__}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape) or len(shape) > 2:
        raise ValueError(f"shape {shape!r} is not a list of at most 2 sizes")
    if not isinstance(data, str):
        raise TypeError(f"data must be a base64 string, got {type(data).__name__}")
    raw = base64.b64decode(data.encode("ascii"), validate=True)
    little = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    if len(raw) != math.prod(shape) * little.itemsize:
        raise ValueError(f"{len(raw)} bytes do not make shape {shape} of {dtype}")
    array = np.frombuffer(raw, dtype=little).reshape(shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("it holds NaN or infinite values")
    return array.astype(np.float32 if array.dtype.kind == "f" else np.int64)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def stratified_folds(labels: np.ndarray, folds: int = CROSS_FOLDS, seed: int = 0) -> np.ndarray:
    """(N,) fold of each photo: each class's photos dealt round the folds from a random start, so a
    class of n <= folds photos lies in n different folds and every fold holds its share of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = rng.permutation(np.flatnonzero(labels == c))
        fold[where] = (np.arange(len(where)) + rng.integers(folds)) % folds
    return fold


def covered(labels: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """(N,) bool: photos whose class has photos in other folds. Only they count in a cross-fit: a fit
    without any photo of a species says nothing of how an unseen photo of a known species scores."""
    _, labels = np.unique(labels, return_inverse=True)
    _, fold = np.unique(fold, return_inverse=True)
    per_fold = np.zeros((labels.max() + 1, fold.max() + 1), dtype=np.int64)  # (classes, folds) photo counts
    np.add.at(per_fold, (labels, fold), 1)
    return per_fold.sum(1)[labels] > per_fold[labels, fold]


def cross_fitted_scores(method: str, features: np.ndarray, labels: np.ndarray, fold: np.ndarray, *,
                        max_rank: int = MAX_RANK) -> np.ndarray:
    """(N,) feature scores, each photo's from the arrays fitted on the other folds (nan where its
    class is in no other fold)."""
    features, labels, fold = np.asarray(features), np.asarray(labels), np.asarray(fold)
    scores = np.full(len(labels), np.nan)
    inside = covered(labels, fold)
    for k in np.unique(fold):
        rest, held = fold != k, (fold == k) & inside
        if not held.any():
            continue
        # A fit's class indices are those of the classes it has: the score is a minimum over classes.
        _, dense = np.unique(labels[rest], return_inverse=True)
        arrays = fit_feature_arrays(method, features[rest], dense, max_rank=max_rank)
        scores[held] = feature_score(method, features[held], arrays)
    return scores


def fit_calibration(logits: np.ndarray, labels: np.ndarray, fold: np.ndarray, *, method: str,
                    features: np.ndarray | None = None, negative_logits: np.ndarray | None = None,
                    negative_features: np.ndarray | None = None, keep: float = KEEP,
                    max_rank: int = MAX_RANK) -> Calibration:
    """The calibration from the species photos of train and valid, cross-fitted (module docstring).

    logits (N, C): each photo's logits from a head trained on the other folds of `fold` (N,) alone;
    labels (N,); features (N, D): their features, for a feature score, whose arrays are fitted on all
    of them while the threshold comes from cross-fitted scores; negatives' logits (from the head
    being calibrated) and features: photos that are none of the species (see `choose_threshold`).
    """
    if method not in METHODS:
        raise UserError(f"unknown score {method!r}; choose one of {', '.join(METHODS)}")
    given = {"species photos' logits": logits, "species photos' features": features,
             "negatives' logits": negative_logits, "negatives' features": negative_features}
    broken = [name for name, values in given.items()
              if values is not None and not np.isfinite(np.asarray(values, dtype=np.float64)).all()]
    if broken:  # a fit on them would fail deep inside numpy, or store a threshold of nan
        raise UserError(f"cannot calibrate: the {' and '.join(broken)} hold values that are not finite numbers "
                        f"(broken photos or backbone); check the data with `python -m flower_classifier check-data`")
    labels, fold = np.asarray(labels), np.asarray(fold)
    inside = covered(labels, fold)
    if not inside.any():
        raise UserError("calibrating needs a species with at least two photos across the train and valid splits")
    logits = np.asarray(logits)
    calibration = Calibration(fit_temperature(logits[inside], labels[inside]), method)
    if method in FEATURE_METHODS:
        if features is None:
            raise ValueError(f"the {method} score needs the species photos' features")
        calibration.arrays = fit_feature_arrays(method, features, labels, max_rank=max_rank)
        species = cross_fitted_scores(method, features, labels, fold, max_rank=max_rank)[inside]
    else:
        species = calibration.scores(logits[inside])
    negatives = None
    if negative_logits is not None or negative_features is not None:
        negatives = calibration.scores(negative_logits, negative_features)
    calibration.threshold, calibration.rule = choose_threshold(
        species, negatives, keep=keep, of="cross-fitted train+valid photos")
    return calibration


# ---------------------------------------------------------------- figures (matplotlib only when drawn)

def plot_reliability(before: Reliability, after: Reliability, *, save_to=None):
    """calibration.png: accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib.pyplot as plt

    from .plots import _finish

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, bins, title in zip(axes, (before, after), ("before", "after temperature scaling")):
        width = np.diff(bins.edges)
        shown = bins.counts > 0
        ax.bar(bins.edges[:-1][shown], bins.accuracy[shown], width=width[shown], align="edge",
               edgecolor="black", label="accuracy")
        ax.bar(bins.edges[:-1][shown], (bins.confidence - bins.accuracy)[shown], bottom=bins.accuracy[shown],
               width=width[shown], align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               title=f"{title}: ECE {100 * bins.ece:.1f}%")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return _finish(fig, save_to)


def plot_score_histograms(species_scores: np.ndarray, negative_scores: np.ndarray, threshold: float, *,
                          method: str = "", save_to=None):
    """The unknown score of species photos and of photos that are none of them, with the threshold."""
    import matplotlib.pyplot as plt

    from .plots import _finish

    fig, ax = plt.subplots(figsize=(7, 3.8))
    both = np.concatenate([np.ravel(species_scores), np.ravel(negative_scores), [threshold]])
    edges = np.linspace(both.min(), both.max(), 31)
    ax.hist(species_scores, bins=edges, alpha=0.6, label=f"species photos ({len(species_scores)})")
    ax.hist(negative_scores, bins=edges, alpha=0.6, label=f"not the species ({len(negative_scores)})")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold: above it, unknown")
    ax.set(xlabel=f"unknown score ({method})" if method else "unknown score", ylabel="photos")
    ax.legend()
    return _finish(fig, save_to)
