"""The leave-species-out candidates of bench/bench_unknown.py, on generated features (no photos, no training)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from flower_classifier import unknown as unk

_spec = importlib.util.spec_from_file_location("bench_unknown", Path(__file__).parents[1] / "bench" / "bench_unknown.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _species(rng, n=60, d=16, classes=3):
    """Unit-ish features: each class a mean direction plus noise mostly in a few directions of its own."""
    means = rng.normal(size=(classes, d)) * 3
    x, y = [], []
    for c in range(classes):
        spread = np.zeros(d)
        spread[c * 2: c * 2 + 2] = 2.0  # each species spreads along its own two axes
        x.append(means[c] + rng.normal(size=(n, d)) * (0.1 + spread))
        y.append(np.full(n, c))
    return np.concatenate(x).astype(np.float32), np.concatenate(y), means


def test_residual_is_larger_off_the_principal_subspace():
    rng = np.random.default_rng(0)
    x, y, _ = _species(rng)
    arrays = bench.fit_principal(x, y, dims=6)
    inside = bench.residual_norm(x[:5], arrays)
    outside = bench.residual_norm(rng.normal(size=(5, x.shape[1])).astype(np.float32), arrays)
    assert outside.min() > inside.max()


def test_z_sum_puts_each_part_on_its_cross_fitted_scale():
    crossed = np.array([1.0, 2.0, 3.0, np.nan])
    part = {"crossed": crossed, "own": np.array([2.0]), "near": np.array([4.0]), "far": np.array([0.0])}
    doubled = {k: 10 * v for k, v in part.items()}
    inside = np.isfinite(crossed)
    out = bench.z_sum([part, doubled], inside)
    sd = np.std([1.0, 2.0, 3.0])
    assert out["own"][0] == pytest.approx(0.0)  # at the mean of both parts
    assert out["near"][0] == pytest.approx(2 * 2 / sd)  # each part counts alike, whatever its scale


def test_candidate_scores_give_every_set_a_score_per_photo():
    rng = np.random.default_rng(2)
    x, y, _ = _species(rng, n=40)
    d, hidden, classes = x.shape[1], 8, 3
    w0, w3 = rng.normal(size=(hidden, d)).astype(np.float32), rng.normal(size=(classes, hidden)).astype(np.float32)
    logits = lambda f: np.maximum(f @ w0.T, 0) @ w3.T  # noqa: E731
    own, near, far = x[::4], rng.normal(size=(10, d)).astype(np.float32), 10 * rng.normal(size=(12, d)).astype(np.float32)
    a = {"x": x, "y": y, "fold": unk.stratified_folds(y), "crossed": logits(x), "n_train": np.array(90),
         "head_0.weight": w0, "head_0.bias": np.zeros(hidden, np.float32), "head_3.weight": w3,
         "head_3.bias": np.zeros(classes, np.float32),
         **{f"{s}_x": v for s, v in (("own", own), ("near", near), ("far", far))},
         **{f"{s}_logits": logits(v) for s, v in (("own", own), ("near", near), ("far", far))}}
    out = bench.candidate_scores(a)
    for name in ("vim (64 directions)", "knn1 centred", unk.SPECIES, "z-sum(energy+knn1)",
                 "react (clip at 99th percentile)", "mahalanobis on the head's hidden layer"):
        sc = out[name]
        assert [len(sc[s]) for s in ("own", "near", "far")] == [len(own), len(near), len(far)], name
        assert np.isfinite(sc["crossed"]).sum() > 0 and all(np.isfinite(sc[s]).all() for s in ("own", "near", "far"))
    assert np.median(out[unk.SPECIES]["far"]) > np.median(out[unk.SPECIES]["own"])
