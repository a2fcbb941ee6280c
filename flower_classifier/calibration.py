"""Probabilities that mean what they say, and the stored calibration: numpy only, so the PyTorch
checkpoint and the torch-free ONNX app share this one implementation (scipy's scalar search is
imported only where a temperature is fitted).

Temperature scaling: one scalar T, fitted by minimising the negative log-likelihood of cross-fitted
logits; the probabilities shown are softmax(logits / T). Expected calibration error (ECE) over
equal-width confidence bins measures how far "80%" is from "right 8 times in 10".

`fit_calibration` puts T together with an unknown score and its threshold (`unknown`: the scores,
their arrays, the thresholds). Cross-fitted: the species photos of train and valid are dealt into
folds, and each photo is scored (logits and unknown score) by a fit on the other folds alone, so
every one of them scores as an unseen photo would. T and the threshold (keep 95% of those scores;
and, when given, a folder of photos that are none of the species) come from all of them, not from
the 50 of a small validation split, whose quantile and temperature swing from split to split. A
feature score's arrays are then fitted on all of train and valid.

`Calibration` holds all that prediction needs (T, method, threshold, the score's arrays) as plain
data: `to_dict` gives JSON-ready values (arrays as base64 float16), `from_dict` checks every field.
"""
from __future__ import annotations

import base64
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .near_far import fit_near_far, near_far_parts
from .unknown import (FEATURE_METHODS, KEEP, MAX_RANK, METHODS, NEAR_FAR, SPECIES, as_stored,
                      choose_threshold, covered, cross_fitted_scores, feature_score, fit_feature_arrays,
                      log_softmax, logit_score, softmax)

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)
FORMAT_VERSION = 1


# ---------------------------------------------------------------- temperature and calibration error

def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    logp = log_softmax(logits, temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the NLL of (logits (N, C), labels (N,)).

    The NLL is convex in 1/T, so a bounded scalar search over log T finds the one minimum; the bounds
    only bite when no photo is wrong (the NLL then keeps falling as T -> 0).
    """
    from scipy.optimize import minimize_scalar  # here: prediction never fits, and scipy costs start-up time

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


# ---------------------------------------------------------------- what a checkpoint and an ONNX file carry

@dataclass
class Assessment:
    probabilities: np.ndarray  # (N, C) softmax(logits / T)
    scores: np.ndarray  # (N,) higher = less like the training species
    unknown: np.ndarray  # (N,) bool: score above the threshold
    # (N,) bool, near_far only: its far part (Mahalanobis) alone is above the threshold. A diagnostic,
    # not an answer: it does not tell non-flowers from other species reliably (see `unknown`).
    far: np.ndarray | None = None


@dataclass
class Calibration:
    """Temperature, unknown score and threshold: all that prediction needs, as plain data."""

    temperature: float = 1.0
    method: str = "msp"
    threshold: float = 1.0  # unknown when the score is above it
    rule: str = ""  # how the threshold was chosen, in words
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # what a feature score needs
    kept: float | None = None  # share of the species photos the threshold keeps (None: not recorded)

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def scores(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        return self._parts(logits, features)[0]

    def _parts(self, logits: np.ndarray, features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(scores (N,), far (N,) or None): near_far's far part."""
        if self.needs_features and features is None:
            raise ValueError(f"the {self.method} score needs the backbone's features")
        if self.method == NEAR_FAR:
            near, far = near_far_parts(logits, features, self.temperature, self.arrays)
            return np.maximum(near, far), far
        if self.needs_features:
            return feature_score(self.method, features, self.arrays), None
        return logit_score(self.method, logits, self.temperature), None

    def assess(self, logits: np.ndarray, features: np.ndarray | None = None) -> Assessment:
        """The one call both backends make per batch: logits (N, C), features (N, D) -> Assessment."""
        scores, far = self._parts(logits, features)
        return Assessment(self.probabilities(logits), scores, scores > self.threshold,
                          None if far is None else far > self.threshold)

    def refusal(self) -> str:
        """The threshold's cost, for the model card: what share of its own species it refuses, and
        what the threshold was tuned on."""
        kept = f"{1 - self.kept:.0%}" if self.kept is not None else f"about {1 - KEEP:.0%}"
        return (f"It refuses {kept} of photos of its own species as unknown (the {self.method} score above "
                f"{self.threshold:.4g}); the threshold {self.rule or 'was set by hand'}.")

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
                "arrays": {name: _encode(a) for name, a in self.arrays.items()},
                **({} if self.kept is None else {"kept": float(self.kept)})}

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
        kept = d.get("kept")
        if kept is not None and not (_is_real(kept) and 0 <= kept <= 1):
            fail("kept", f"must be a share from 0 to 1 (got {kept!r})")
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
        if d["method"] == SPECIES and sizes["S"] != sizes["C"] * sizes["R"]:
            fail("arrays.basis", f"must hold {sizes['R']} directions for each of the {sizes['C']} classes "
                                 f"(got {sizes['S']} rows)")
        positive = [n for n in ("variances", "rest", "k", "spread", "far_scale")
                    if n in arrays and not (arrays[n] > 0).all()]
        if positive:
            fail(f"arrays.{positive[0]}", "must be positive")
        if "k" in arrays and int(arrays["k"]) > len(arrays["bank"]):
            fail("arrays.k", f"must be at most the {len(arrays['bank'])} stored photos")
        return cls(float(d["temperature"]), d["method"], float(d["threshold"]), d.get("rule", ""), arrays,
                   None if kept is None else float(kept))


# The dimensions of each method's arrays: C classes, D feature size, R kept directions, M stored photos,
# S = C * R directions of all classes.
_SHAPES = {"mahalanobis": {"means": "CD", "basis": "RD", "variances": "R", "rest": ""},
           SPECIES: {"means": "CD", "basis": "SD", "variances": "CR", "rest": "C"},
           "cosine": {"directions": "CD"}, "knn": {"bank": "MD", "k": ""}}
_SHAPES[NEAR_FAR] = {**_SHAPES["mahalanobis"], "centre": "C", "spread": "C", "near_cut": "", "far_cut": "",
                     "far_scale": ""}
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
    if method == NEAR_FAR:
        if features is None:
            raise ValueError(f"the {method} score needs the species photos' features")
        calibration.arrays, species = fit_near_far(logits, labels, fold, features, calibration.temperature,
                                                   keep=keep, max_rank=max_rank)
    elif method in FEATURE_METHODS:
        if features is None:
            raise ValueError(f"the {method} score needs the species photos' features")
        calibration.arrays = as_stored(fit_feature_arrays(method, features, labels, max_rank=max_rank))
        species = cross_fitted_scores(method, features, labels, fold, max_rank=max_rank)[inside]
    else:
        species = calibration.scores(logits[inside])
    negatives = None
    if negative_logits is not None or negative_features is not None:
        negatives = calibration.scores(negative_logits, negative_features)
    calibration.threshold, calibration.rule = choose_threshold(
        species, negatives, keep=keep, of="cross-fitted train+valid photos")
    calibration.kept = float((species <= calibration.threshold).mean())
    return calibration
