"""The "near_far" unknown score: a photo is refused when its top-two logit gap is unusual for the
species it is predicted as (other flower species: "near"), or when its features are farther from
every species, by Mahalanobis distance, than all but a small share of the species' own photos
(non-flowers: "far"). Both parts are on the near part's scale, and the score is their maximum, so
one threshold serves. numpy only, as `unknown` is: the torch-free ONNX app imports it.
"""
from __future__ import annotations

import math

import numpy as np

from .unknown import (KEEP, MAX_RANK, as_stored, covered, cross_fitted_scores, feature_score,
                      fit_feature_arrays, stratified_folds)

# Share of the species' own photos the far part may refuse (the near part has the rest of 1 - keep).
# Leaving each species of flower_photos_2k out (bench_unknown.py --leave_species_out), 2% catches the
# non-flowers that the Mahalanobis score alone catches (98%), 1.5% 97%, 1% 93%; the other species
# caught fall from 24% (1%) to 22% (2%). With few photos the species' own cross-fitted distances have
# a longer tail: on the 250 of the sample, 2% caught 91% of non-flowers against Mahalanobis's 97%, 4%
# 96% (5 seeds). So the far part takes at least FAR_PHOTOS photos' worth (4% of 250, 2% from 500 on).
FAR_SHARE = 0.02
FAR_PHOTOS = 10


def standardization(scores: np.ndarray, predicted: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(centre (C,), spread (C,)): the mean and standard deviation of the scores of the photos
    predicted as each class (fewer than two: all photos'), the spread floored above 0."""
    scores, predicted = np.asarray(scores, dtype=np.float64), np.asarray(predicted)
    centre, spread = np.full(classes, scores.mean()), np.full(classes, scores.std())
    for c in (c for c in range(classes) if (predicted == c).sum() >= 2):
        centre[c], spread[c] = scores[predicted == c].mean(), scores[predicted == c].std()
    return centre, np.maximum(spread, max(1e-3 * float(scores.std()), 1e-6))


def near_base(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) -> (N,) minus the gap of the top two logits / T (leaving species out: 27% caught, energy 22%)."""
    top = np.sort(np.asarray(logits, dtype=np.float64) / temperature, axis=1)[:, -2:]
    return top[:, 0] - top[:, 1]


def near_score(logits: np.ndarray, temperature: float, centre: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N,) `near_base` in standard deviations above the mean of the photos predicted
    as the same class (standardized max-logit, Jung et al. 2021, on the top-two gap)."""
    predicted = np.asarray(logits).argmax(1)
    return (near_base(logits, temperature) - centre[predicted]) / spread[predicted]


def near_far_parts(logits: np.ndarray, features: np.ndarray, temperature: float,
                   arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(near (N,), far (N,)): both on the near part's scale, the score is their maximum."""
    return (near_score(logits, temperature, arrays["centre"], arrays["spread"]),
            _far_part(feature_score("mahalanobis", features, arrays), arrays))


def _far_part(distance: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The Mahalanobis distance past its cut in units of `far_scale`, plus the near cut: above the
    near cut exactly when the distance is above its own."""
    return float(arrays["near_cut"]) + (distance - float(arrays["far_cut"])) / float(arrays["far_scale"])


def far_share_for(photos: int) -> float:
    """The far part's share of `photos` species photos: FAR_SHARE, or FAR_PHOTOS of them when more."""
    return max(FAR_SHARE, FAR_PHOTOS / max(photos, 1))


def fit_near_far(logits: np.ndarray, labels: np.ndarray, fold: np.ndarray, features: np.ndarray,
                 temperature: float, *, keep: float = KEEP, far_share: float | None = None,
                 max_rank: int = MAX_RANK, distance: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The near_far arrays and the cross-fitted scores of the photos whose class is in other folds.

    logits (N, C): cross-fitted; features (N, D); `distance` (N,): their cross-fitted Mahalanobis
    scores when already at hand (`cross_fitted_scores`, with the same folds). The cuts come from
    the cross-fitted scores (`_cuts`); the Mahalanobis arrays from all photos."""
    inside, distance, mahalanobis = _mahalanobis_of(features, labels, fold, max_rank, distance)
    return _cuts(np.asarray(logits)[inside], distance[inside], temperature, mahalanobis,
                 keep=keep, far_share=far_share)


def fit_near_far_valid(valid_logits: np.ndarray, train: tuple[np.ndarray, np.ndarray],
                       valid: tuple[np.ndarray, np.ndarray], temperature: float, *, keep: float = KEEP,
                       far_share: float | None = None, max_rank: int = MAX_RANK,
                       seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The near_far arrays and the valid photos' scores, from a large valid split (`calibrating`):
    the head's own logits (N, C) of the valid photos, which it never trained on, for the near part;
    for the far cut, the cross-fitted Mahalanobis distances of all train and valid photos (`train`,
    `valid`: features and labels), which need no fold heads. Cut on the valid photos' distances
    alone, the far share (2%) would rest on four or five photos: leaving each species out of
    flower_photos_2k, it caught 89% of non-flowers against 97% with the cross-fitted cut. `seed`
    deals the folds (the run's --seed, as the cross-fitted rule's)."""
    x, y = np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]]).astype(np.int64)
    inside, distance, mahalanobis = _mahalanobis_of(x, y, stratified_folds(y, seed=seed), max_rank)
    return _cuts(valid_logits, distance[len(train[1]):], temperature, mahalanobis, keep=keep, far_share=far_share,
                 far_distance=distance[inside])


def _mahalanobis_of(features: np.ndarray, labels: np.ndarray, fold: np.ndarray, max_rank: int,
                    distance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(inside (N,), distance (N,), arrays): which photos the cross-fit covers, their cross-fitted
    Mahalanobis distances (`distance` when already at hand, with the same folds), and the Mahalanobis
    arrays fitted on all photos, at their stored precision: the far part's side of both fits."""
    labels, fold = np.asarray(labels), np.asarray(fold)
    if distance is None:
        distance = cross_fitted_scores("mahalanobis", features, labels, fold, max_rank=max_rank)
    return (covered(labels, fold), np.asarray(distance),
            as_stored(fit_feature_arrays("mahalanobis", features, labels, max_rank=max_rank)))


def _cuts(logits: np.ndarray, distance: np.ndarray, temperature: float, mahalanobis: dict[str, np.ndarray], *,
          keep: float, far_share: float | None, far_distance: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The arrays (`mahalanobis`'s, and the cuts) and the scores of species photos that no fit saw:
    their logits (N, C) and Mahalanobis distances (N,). The far cut keeps all but `far_share` (None:
    `far_share_for` their number; at most 80% of 1 - keep) of `far_distance` (default: `distance`); the
    near cut is the lowest that, with it, keeps `keep` of the photos; the gap's centre and spread per
    predicted class come from these logits."""
    logits, distance = np.asarray(logits, dtype=np.float64), np.asarray(distance, dtype=np.float64)
    far_distance = distance if far_distance is None else np.asarray(far_distance, dtype=np.float64)
    # Every array at the precision it is stored in (float16), the cuts rounded up, so that the scores
    # here are those a saved calibration gives and the cuts keep at least what they should.
    centre, spread = (as_stored(a) for a in standardization(near_base(logits, temperature),
                                                            logits.argmax(1), logits.shape[1]))
    near = near_score(logits, temperature, centre, spread)
    share = min(far_share_for(len(far_distance)) if far_share is None else far_share, 0.8 * (1 - keep))
    far_cut = _up16(np.sort(far_distance)[max(math.ceil((1 - share) * len(far_distance)) - 1, 0)])
    within = distance <= far_cut
    # The lowest near cut keeping `keep` of all photos, those beyond the far cut counted as refused
    # (if the far cut alone refuses more than 1 - keep of them, it keeps what the far cut leaves).
    candidates = np.sort(near[within])
    near_cut = _up16(candidates[min(max(math.ceil(keep * len(near)), 1), len(candidates)) - 1])
    far_scale = as_stored(max(float(far_distance.std()), 1e-3))
    arrays = {**mahalanobis, "centre": centre, "spread": spread, "near_cut": near_cut, "far_cut": far_cut,
              "far_scale": far_scale}
    return arrays, np.maximum(near, _far_part(distance, arrays))


def _up16(value: float) -> np.ndarray:
    """`value` rounded up to a float16: a cut rounded down would keep fewer photos than asked."""
    r = np.float16(value)
    return as_stored(np.nextafter(r, np.float16(np.inf)) if r < value else r)
