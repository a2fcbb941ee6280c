"""Temperature scaling, calibration error, unknown scores, thresholds and the stored calibration state,
on synthetic logits and features whose right answers are known."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from flower_classifier import calibration as cal, near_far, plots, unknown as unk
from flower_classifier.errors import UserError


def sampled_labels(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature): the model is calibrated at that temperature."""
    p = cal.softmax(logits, temperature)
    return (rng.random(len(p))[:, None] > p.cumsum(1)).sum(1).clip(0, p.shape[1] - 1)


@pytest.mark.parametrize("true_t", [0.5, 2.0])  # logits under- and over-confident by this factor
def test_fit_temperature_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6000, 5)) * 3
    labels = sampled_labels(logits, true_t, rng)
    t = cal.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    assert cal.nll(logits, labels, t) <= cal.nll(logits, labels, 1.0)


def test_ece_near_zero_when_calibrated_large_when_overconfident_and_fixed_by_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20000, 4)) * 2
    labels = sampled_labels(logits, 1.0, rng)
    assert cal.expected_calibration_error(cal.softmax(logits), labels) < 0.015
    overconfident = logits * 3
    assert cal.expected_calibration_error(cal.softmax(overconfident), labels) > 0.1
    t = cal.fit_temperature(overconfident, labels)
    assert cal.expected_calibration_error(cal.softmax(overconfident, t), labels) < 0.015


def test_reliability_bins_hold_every_photo_and_put_certainty_in_the_top_bin():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.96, 0.04], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    bins = cal.reliability(probs, labels)
    assert bins.counts.sum() == 4 and len(bins.counts) == cal.ECE_BINS
    assert bins.counts[-1] == 2 and bins.accuracy[-1] == 0.5  # 1.0 and 0.96: one right, one wrong
    # By hand: top bin |0.5 - 0.98| * 2/4, bin of 0.5 |0 - 0.5| * 1/4 (argmax picks 0), of 0.7 |1 - 0.7| * 1/4.
    assert bins.ece == pytest.approx(0.48 * 0.5 + 0.5 * 0.25 + 0.3 * 0.25)


def test_ece_noise_floor_is_large_for_few_photos_and_small_for_many():
    probs = cal.softmax(np.random.default_rng(2).normal(size=(2000, 5)) * 2)
    assert cal.ece_noise_floor(probs[:50], draws=200) > 3 * cal.ece_noise_floor(probs, draws=50)


def test_auroc_by_hand_with_ties():
    # Pairs (known, unknown): 1<2, 2=2 (half), 3>2, 1<4, 2<4, 3<4 -> 4.5 of 6.
    assert unk.auroc([1, 2, 3], [2, 4]) == pytest.approx(0.75)
    assert unk.auroc([0, 1], [2, 3]) == 1.0
    assert unk.auroc([2, 3], [0, 1]) == 0.0
    assert unk.auroc([5, 5, 5], [5, 5]) == 0.5


def shifted_clusters(rng, *, classes=4, dim=32, per_class=40):
    """Known classes around their own directions; unknown photos around directions of their own."""
    centres = rng.normal(size=(classes + 3, dim)) * 3
    def draw(which, n):
        return centres[which] + rng.normal(size=(n, dim))
    labels = np.repeat(np.arange(classes), per_class)
    train = draw(labels, len(labels))
    test_labels = np.repeat(np.arange(classes), 10)
    test = draw(test_labels, len(test_labels))
    unknown = draw(rng.integers(classes, classes + 3, 40), 40)
    # Logits of a head that knows the classes: its class means as weights.
    weights = np.stack([train[labels == c].mean(0) for c in range(classes)]) / 10
    return train, labels, test, test_labels, unknown, weights


@pytest.mark.parametrize("method", [m for m in cal.METHODS if m != unk.NEAR_FAR])  # near_far: test_unknown_kinds
def test_each_score_separates_a_shifted_cluster(method):
    train, labels, test, _, unknown, w = shifted_clusters(np.random.default_rng(3))
    c = cal.Calibration(method=method, arrays=unk.fit_feature_arrays(method, train, labels)
                        if method in cal.FEATURE_METHODS else {})
    known_scores, unknown_scores = c.scores(test @ w.T, test), c.scores(unknown @ w.T, unknown)
    assert known_scores.shape == (len(test),)
    assert unk.auroc(known_scores, unknown_scores) > 0.95


def test_low_rank_mahalanobis_equals_the_dense_ledoit_wolf_computation():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(60, 8)) * np.linspace(0.2, 3, 8) + 1, np.repeat([0, 1, 2], 20)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([u[y == c].mean(0) for c in range(3)])
    r = u - means[y]
    s = r.T @ r / len(r)
    mu = np.trace(s) / 8
    beta = sum(np.linalg.norm(np.outer(v, v) - s) ** 2 for v in r) / len(r) ** 2
    alpha = min(beta, np.linalg.norm(s - mu * np.eye(8)) ** 2) / np.linalg.norm(s - mu * np.eye(8)) ** 2
    precision = np.linalg.inv(alpha * mu * np.eye(8) + (1 - alpha) * s)
    probe = rng.normal(size=(5, 8)) + 1
    pu = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    dense = np.sqrt(np.min([np.einsum("nd,de,ne->n", pu - m, precision, pu - m) for m in means], axis=0))
    arrays = unk.fit_feature_arrays("mahalanobis", x, y, max_rank=8)
    assert unk.feature_score("mahalanobis", probe, arrays) == pytest.approx(dense, rel=5e-3)


def test_validation_threshold_keeps_the_asked_share():
    valid = np.random.default_rng(5).normal(size=200)
    threshold, rule = unk.choose_threshold(valid, keep=0.95)
    assert (valid <= threshold).mean() >= 0.95
    assert (valid < threshold).mean() < 0.95  # the lowest such threshold: no looser than needed
    assert "95%" in rule and "200 validation" in rule
    assert "200 cross-fitted" in unk.choose_threshold(valid, keep=0.95, of="cross-fitted photos")[1]


def test_negatives_put_the_threshold_in_the_gap_and_never_keep_fewer():
    rng = np.random.default_rng(6)
    valid, negatives = rng.uniform(0, 1, 100), rng.uniform(3, 4, 50)
    threshold, rule = unk.choose_threshold(valid, negatives, keep=0.95)
    assert threshold == pytest.approx((valid.max() + negatives.min()) / 2)
    assert "negatives" in rule and "100%" in rule
    overlapping = rng.normal(0.5, 1, 50)
    threshold, _ = unk.choose_threshold(valid, overlapping, keep=0.9)
    assert (valid <= threshold).mean() >= 0.9


def fitted(method: str, negatives: bool = False) -> cal.Calibration:
    train, labels, _, _, unknown, w = shifted_clusters(np.random.default_rng(7))
    extra = dict(negative_logits=unknown @ w.T, negative_features=unknown) if negatives else {}
    return cal.fit_calibration(train @ w.T, labels, unk.stratified_folds(labels), method=method, features=train,
                               **extra)


@pytest.mark.parametrize("method", cal.METHODS)
def test_round_trip_through_json_gives_the_same_answers(method):
    c = fitted(method, negatives=True)
    back = cal.Calibration.from_dict(json.loads(json.dumps(c.to_dict())), num_classes=4, feature_dim=32)
    assert (back.temperature, back.method, back.threshold, back.rule) == (c.temperature, method, c.threshold, c.rule)
    assert "negatives" in back.rule and back.summary() == c.summary() and method in c.summary()
    probe = np.random.default_rng(8).normal(size=(6, 32))
    logits = probe[:, :4]
    a, b = c.assess(logits, probe), back.assess(logits, probe)
    np.testing.assert_array_equal(a.scores, b.scores)  # arrays are stored as fitted (float16 values)
    for name, array in c.arrays.items():  # fitted at the stored precision (`unknown.as_stored`)
        assert back.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(back.arrays[name], array)
    np.testing.assert_array_equal(a.unknown, b.unknown)
    np.testing.assert_array_equal(a.far, b.far)
    np.testing.assert_allclose(b.probabilities.sum(1), 1.0)
    assert back.storage_bytes() == c.storage_bytes() and back.kept == c.kept is not None


def damaged(d: dict, change) -> dict:
    d = copy.deepcopy(d)
    change(d)
    return d


def _set_array(name, key, value):
    def change(d):
        d["arrays"][name][key] = value
    return change


def _nan_means(d):
    means = cal._decode(d["arrays"]["means"]).copy()
    means[0, 0] = np.nan
    d["arrays"]["means"] = cal._encode(means)


DAMAGE = {
    "temperature": lambda d: d.update(temperature=float("nan")),
    "threshold": lambda d: d.update(threshold="0.5"),
    "method": lambda d: d.update(method="guess"),
    "version": lambda d: d.update(version=99),
    "arrays": lambda d: d["arrays"].pop("basis"),
    "arrays.means": _nan_means,
    "arrays.basis": _set_array("basis", "shape", [3, 31]),
    "arrays.variances": _set_array("variances", "data", "not base64!"),
    "arrays.rest": _set_array("rest", "dtype", "float64"),
}


@pytest.mark.parametrize("field", DAMAGE)
def test_from_dict_refuses_damaged_data_naming_the_field(field):
    good = fitted("mahalanobis").to_dict()
    with pytest.raises(UserError, match=rf"model.pth: calibration field '{field}'"):
        cal.Calibration.from_dict(damaged(good, DAMAGE[field]), where="model.pth")


def test_from_dict_refuses_arrays_of_another_model():
    d = fitted("cosine").to_dict()
    cal.Calibration.from_dict(d, num_classes=4, feature_dim=32)
    with pytest.raises(UserError, match="arrays.directions.*C = 5"):
        cal.Calibration.from_dict(d, num_classes=5)
    with pytest.raises(UserError, match="'\\(all\\)'"):
        cal.Calibration.from_dict([d])


def test_figures_are_written(tmp_path):
    probs = cal.softmax(np.random.default_rng(9).normal(size=(100, 3)))
    labels = probs.argmax(1)
    before, after = cal.reliability(probs, labels), cal.reliability(probs ** 0.5, labels)
    plots.plot_reliability(before, after, save_to=tmp_path / "calibration.png")
    plots.plot_score_histograms(np.arange(10.0), np.arange(5.0, 15), 9.5, method="knn", save_to=tmp_path / "h.png")
    assert (tmp_path / "calibration.png").stat().st_size > 1000 and (tmp_path / "h.png").stat().st_size > 1000


def test_prediction_imports_neither_torch_nor_scipy_nor_matplotlib():
    # The ONNX app's cold start: the calibration and unknown scores load with numpy alone.
    code = ("import sys, flower_classifier.predictor, flower_classifier.calibration, flower_classifier.unknown; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'scipy', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_non_finite_inputs_are_refused_in_one_line_naming_them():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(20, 3)), np.arange(20) % 3
    fold = unk.stratified_folds(labels)
    features = rng.normal(size=(20, 8))
    broken = features.copy()
    broken[3, 2] = np.inf
    with pytest.raises(UserError, match="species photos' features hold values that are not finite"):
        cal.fit_calibration(logits, labels, fold, method="mahalanobis", features=broken)
    logits[0, 0] = np.nan
    with pytest.raises(UserError, match="species photos' logits hold"):
        cal.fit_calibration(logits, labels, fold, method="msp")


# ---------------------------------------------------------------- cross-fitting

def test_stratified_folds_spread_each_class_and_cover_all_but_lone_photos():
    labels = np.array([0] * 12 + [1] * 3 + [2])
    fold = unk.stratified_folds(labels, 5, seed=1)
    assert sorted(np.bincount(fold[:12], minlength=5)) == [2, 2, 2, 3, 3]  # 12 photos over 5 folds
    assert len(set(fold[12:15])) == 3  # 3 photos of a class: 3 different folds
    np.testing.assert_array_equal(unk.covered(labels, fold), [True] * 15 + [False])  # class 2 has one photo


def test_cross_fitted_scores_are_those_of_a_fit_without_the_photo():
    train, labels, *_ = shifted_clusters(np.random.default_rng(11))
    fold = unk.stratified_folds(labels, 4)
    scores = unk.cross_fitted_scores("mahalanobis", train, labels, fold, max_rank=8)
    held = fold == 2
    by_hand = unk.feature_score("mahalanobis", train[held],
                                unk.fit_feature_arrays("mahalanobis", train[~held], labels[~held], max_rank=8))
    np.testing.assert_allclose(scores[held], by_hand)
    everyone = unk.fit_feature_arrays("mahalanobis", train, labels, max_rank=8)
    in_sample = unk.feature_score("mahalanobis", train, everyone)
    assert np.median(scores) > np.median(in_sample)  # a photo the fit saw looks closer than it would unseen


def svd_reference(x: np.ndarray, labels: np.ndarray, max_rank: int) -> dict:
    """The Mahalanobis arrays by a full SVD of the residuals: what the eigen-based fit must equal."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([u[labels == c].mean(0) for c in range(labels.max() + 1)])
    r = u - means[labels]
    n, d = r.shape
    _, s, vt = np.linalg.svd(r, full_matrices=False)
    eig = s ** 2 / n
    mu = eig.sum() / d
    spread = (eig ** 2).sum() - d * mu ** 2
    noise = ((np.linalg.norm(r, axis=1) ** 4).sum() / n - (eig ** 2).sum()) / n
    shrink = min(max(noise, 0) / spread, 1)
    rest = (1 - shrink) * eig[max_rank:].sum() / (d - max_rank) + shrink * mu
    return {"means": means, "basis": vt[:max_rank], "rest": rest,
            "variances": np.maximum((1 - shrink) * eig[:max_rank] + shrink * mu, rest)}


@pytest.mark.parametrize("photos", [30, 300])  # fewer photos than dimensions (Gram side) and more
def test_eigen_fit_and_its_per_fold_downdate_equal_a_full_svd(photos):
    rng = np.random.default_rng(12)
    labels = np.arange(photos) % 3
    x = rng.normal(size=(3, 60))[labels] + rng.normal(size=(photos, 60)) * np.linspace(2, 0.1, 60)
    want = svd_reference(x, labels, 8)
    got = unk.fit_feature_arrays("mahalanobis", x, labels, max_rank=8)
    np.testing.assert_allclose(got["variances"], want["variances"], rtol=1e-4)
    assert float(got["rest"]) == pytest.approx(want["rest"], rel=1e-4)
    np.testing.assert_allclose(np.abs(got["basis"] @ want["basis"].T), np.eye(8), atol=1e-3)  # same directions
    # Cross-fitted: fold k's fit downdated from the whole scatter equals a fit on the other folds.
    fold = unk.stratified_folds(labels, 3)
    scores = unk.cross_fitted_scores("mahalanobis", x, labels, fold, max_rank=8)
    held = fold == 1
    alone = unk.fit_feature_arrays("mahalanobis", x[~held], labels[~held], max_rank=8)
    np.testing.assert_allclose(scores[held], unk.feature_score("mahalanobis", x[held], alone), rtol=1e-4)


def few_per_class(rng, classes: int, per_class: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features around `centres` of `classes` classes, `per_class` photos each."""
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), centres.shape[1])), labels


def test_cross_fitted_threshold_keeps_the_asked_share_of_fresh_photos_more_steadily():
    """On Gaussian features with few photos per class, as in the sample: the share of fresh species
    photos the default score calls unknown is closer to 1 - keep (root mean square over draws) and
    steadier with the threshold from cross-fitted scores over train+valid than with the one from the
    validation photos alone (20 here: a high quantile of few scores swings and, as an order statistic,
    sits low; cross-fitted scores, each from a fit on 80% of the photos, sit a little high instead)."""
    rng = np.random.default_rng(12)
    method = "mahalanobis"
    classes, dim, keep = 20, 16, 0.9
    valid_only, crossed = [], []
    for _ in range(30):
        centres = rng.normal(size=(classes, dim)) * 2
        (train, y_train), (valid, y_valid) = (few_per_class(rng, classes, n, centres) for n in (3, 1))
        fresh, _ = few_per_class(rng, classes, 50, centres)
        arrays = unk.fit_feature_arrays(method, train, y_train, max_rank=8)  # the old rule: train only
        threshold, _ = unk.choose_threshold(unk.feature_score(method, valid, arrays), keep=keep)
        valid_only.append((unk.feature_score(method, fresh, arrays) > threshold).mean())
        x, y = np.concatenate([train, valid]), np.concatenate([y_train, y_valid])
        c = cal.fit_calibration(np.zeros((len(y), classes)), y, unk.stratified_folds(y), method=method,
                                features=x, keep=keep, max_rank=8)
        crossed.append((c.scores(None, fresh) > c.threshold).mean())
    error = {name: np.sqrt(np.mean((np.array(rates) - (1 - keep)) ** 2))
             for name, rates in (("valid", valid_only), ("crossed", crossed))}
    assert error["crossed"] < 0.8 * error["valid"], error
    assert np.std(crossed) < 0.6 * np.std(valid_only)  # steadier from draw to draw


def test_temperature_from_cross_fitted_logits_and_arrays_from_every_photo():
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(300, 5)) * 3
    labels = sampled_labels(logits, 2.0, rng)  # logits twice as sure as they should be
    features = rng.normal(size=(300, 8)) + labels[:, None]
    c = cal.fit_calibration(logits, labels, unk.stratified_folds(labels), method="cosine", features=features)
    assert c.temperature == pytest.approx(2.0, rel=0.2)
    assert c.arrays["directions"].shape == (5, 8) and "300 cross-fitted" in c.rule
    with pytest.raises(UserError, match="at least two photos"):
        cal.fit_calibration(logits[:3], np.arange(3), np.zeros(3, dtype=int), method="msp")


# ---------------------------------------------------------------- near_far: other species and non-flowers

def flowers_and_others(rng, *, classes=4, dim=32, per_class=60):
    """Known species: features around their class centre, the head sure of their class. A flower of
    another species: features near a known centre (it looks like one), the head torn between two
    classes. A non-flower: features far from every centre, and a head as sure as for a known one."""
    centres = rng.normal(size=(classes, dim)) * 3
    def known(n):
        y = rng.integers(0, classes, n)
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), y] += 6
        return centres[y] + rng.normal(size=(n, dim)), logits, y
    x, logits, y = known(classes * per_class)
    test_x, test_logits, _ = known(80)
    n = 60
    near_x = centres[rng.integers(0, classes, n)] + rng.normal(size=(n, dim))
    near_logits = rng.normal(size=(n, classes))
    near_logits[:, :2] += 2.5  # between the first two classes
    far_x = rng.normal(size=(n, dim)) * 3 + 12 * rng.normal(size=dim)  # a place no species is
    far_logits = rng.normal(size=(n, classes))
    far_logits[np.arange(n), rng.integers(0, classes, n)] += 6
    return (x, logits, y), (test_x, test_logits), (near_x, near_logits), (far_x, far_logits)


def test_near_far_refuses_other_species_and_non_flowers_and_its_far_part_fires_for_the_far_ones():
    (x, logits, y), test, near, far = flowers_and_others(np.random.default_rng(20))
    c = cal.fit_calibration(logits, y, unk.stratified_folds(y), method=unk.NEAR_FAR, features=x)
    own, other, odd = (c.assess(lg, f) for f, lg in (test, near, far))
    assert unk.auroc(own.scores, other.scores) > 0.95 and unk.auroc(own.scores, odd.scores) > 0.99
    assert own.unknown.mean() < 0.15 and other.unknown.mean() > 0.8 and odd.unknown.mean() > 0.95
    # The far part fires for the non-flowers, hardly for the other species (which look like flowers).
    assert odd.far.mean() > 0.95 and other.far.mean() < 0.1 and not own.far[~own.unknown].any()
    assert cal.fit_calibration(logits, y, unk.stratified_folds(y), method="msp").assess(*near[::-1]).far is None


def test_near_far_keeps_the_asked_share_and_gives_the_far_part_its_budget():
    (x, logits, y), *_ = flowers_and_others(np.random.default_rng(21))
    fold = unk.stratified_folds(y)
    temperature = cal.fit_temperature(logits, y)
    arrays, scores = near_far.fit_near_far(logits, y, fold, x, temperature, keep=0.9, far_share=0.02)
    assert 0.9 <= (scores <= arrays["near_cut"]).mean() < 0.9 + 1.5 / len(y)
    distance = unk.cross_fitted_scores("mahalanobis", x, y, fold)
    assert (distance > arrays["far_cut"]).mean() == pytest.approx(0.02, abs=1.5 / len(y))
    # With keep 1 nothing of its own is refused, and the far part gets none of the (empty) budget.
    arrays, scores = near_far.fit_near_far(logits, y, fold, x, temperature, keep=1.0)
    assert (scores <= arrays["near_cut"]).all()


def test_near_far_from_a_valid_split_cuts_near_on_its_logits_and_far_on_all_photos_cross_fitted():
    """The cheap rule (a large valid split, or fine-tuned blocks): the head's own logits of the valid
    photos for the near part, no fold heads; the far cut from every train and valid photo's
    cross-fitted distance (the valid photos alone would set it on one or two photos)."""
    (x, logits, y), test, near, far = flowers_and_others(np.random.default_rng(22))
    train, valid = slice(0, 160), slice(160, None)
    temperature = cal.fit_temperature(logits[valid], y[valid])
    arrays, scores = near_far.fit_near_far_valid(logits[valid], (x[train], y[train]), (x[valid], y[valid]),
                                                 temperature, keep=0.9, far_share=0.02)
    assert len(scores) == 80 and 0.9 <= (scores <= arrays["near_cut"]).mean() < 0.9 + 1.5 / 80
    distance = unk.cross_fitted_scores("mahalanobis", x, y, unk.stratified_folds(y))
    assert (distance > arrays["far_cut"]).mean() == pytest.approx(0.02, abs=1.5 / len(y))
    # The near part's per-class centre comes from the valid photos' logits alone.
    centre, _ = near_far.standardization(near_far.near_base(logits[valid], temperature), logits[valid].argmax(1), 4)
    np.testing.assert_allclose(arrays["centre"], centre, rtol=2e-3)
    c = cal.Calibration(temperature, unk.NEAR_FAR, threshold=float(arrays["near_cut"]), arrays=arrays)
    own, other, odd = (c.assess(lg, f) for f, lg in (test, near, far))
    assert own.unknown.mean() < 0.2 and other.unknown.mean() > 0.8 and odd.unknown.mean() > 0.95 and odd.far.mean() > 0.9


def test_the_far_part_takes_a_larger_share_of_few_photos():
    """With few photos the species' own distances have a long tail: the far cut takes at least
    FAR_PHOTOS photos' worth, so that non-flowers stay caught (docs/unknown-and-calibration.md)."""
    assert near_far.far_share_for(250) == pytest.approx(near_far.FAR_PHOTOS / 250) and near_far.FAR_PHOTOS / 250 > near_far.FAR_SHARE
    assert near_far.far_share_for(5000) == near_far.FAR_SHARE
    (x, logits, y), *_ = flowers_and_others(np.random.default_rng(23), per_class=25)  # 100 photos: 10%, capped at 4%
    fold = unk.stratified_folds(y)
    arrays, _ = near_far.fit_near_far(logits, y, fold, x, cal.fit_temperature(logits, y), keep=0.95)
    distance = unk.cross_fitted_scores("mahalanobis", x, y, fold)
    assert (distance > arrays["far_cut"]).mean() == pytest.approx(0.04, abs=1.5 / len(y))


def test_near_score_is_standardized_by_the_predicted_class():
    logits = np.array([[4.0, 0], [6, 0], [0, 1], [0, 3], [0, 5]])
    raw = near_far.near_base(logits, 1.0)
    assert raw[0] == -4 and raw[3] == -3  # minus the gap between the two largest logits
    centre, spread = near_far.standardization(raw, logits.argmax(1), 3)
    assert centre[0] == pytest.approx(raw[:2].mean()) and spread[1] == pytest.approx(raw[2:].std())
    assert centre[2] == pytest.approx(raw.mean())  # never predicted: all photos' figures
    z = near_far.near_score(logits, 1.0, centre, spread)
    assert z[:2].mean() == pytest.approx(0) and z[2:].std() == pytest.approx(1)
    same = near_far.standardization(np.ones(4), np.zeros(4, dtype=int), 1)[1]
    assert np.isfinite(same).all() and (same > 0).all()  # identical scores divide by a floor, not by 0


def test_refusal_sentence_states_the_share_refused_and_what_it_was_tuned_on():
    c = fitted(unk.NEAR_FAR)
    sentence = c.refusal()
    assert f"{1 - c.kept:.0%} of photos of its own species" in sentence
    assert "cross-fitted train+valid photos" in sentence and "as unknown" in sentence
    assert "negatives" in fitted(unk.NEAR_FAR, negatives=True).refusal()


NEAR_FAR_DAMAGE = {
    "arrays.spread": lambda d: d["arrays"].update(spread=cal._encode(np.zeros(4))),
    "arrays.far_scale": lambda d: d["arrays"].update(far_scale=cal._encode(np.array(-1.0))),
    "arrays.centre": lambda d: d["arrays"].update(centre=cal._encode(np.zeros(5))),
    "arrays": lambda d: d["arrays"].pop("near_cut"),
    "kept": lambda d: d.update(kept=1.5),
}


@pytest.mark.parametrize("field", NEAR_FAR_DAMAGE)
def test_from_dict_refuses_damaged_near_far_values(field):
    good = fitted(unk.NEAR_FAR).to_dict()
    cal.Calibration.from_dict(good, num_classes=4, feature_dim=32)
    with pytest.raises(UserError, match=rf"model.pth: calibration field '{field}'"):
        cal.Calibration.from_dict(damaged(good, NEAR_FAR_DAMAGE[field]), where="model.pth", num_classes=4)


# ---------------------------------------------------------------- one covariance per species

def stretched_species(rng, n: int = 400, d: int = 16):
    """Two species far out along axes 0 and 1, each stretched along its own axis (2 and 3), narrow elsewhere;
    and photos at species 0's place stretched along species 1's axis instead: unlike any species."""
    def draw(species, stretch_axis, count):
        x = rng.normal(size=(count, d)) * 0.1
        x[:, species] += 30
        x[:, stretch_axis] += rng.normal(size=count) * 5
        return x
    x = np.concatenate([draw(0, 2, n), draw(1, 3, n)])
    own = np.concatenate([draw(0, 2, 100), draw(1, 3, 100)])
    return x, np.repeat([0, 1], n), own, draw(0, 3, 100)


def test_each_species_own_covariance_calls_a_photo_stretched_the_wrong_way_unknown():
    """The shared covariance is stretched along both axes, half as much: a photo at species 0's place
    but stretched along species 1's axis looks as usual to it as species 0's own photos do; each
    species' own covariance knows species 0 is narrow there."""
    x, y, own, odd = stretched_species(np.random.default_rng(30))
    shared, per_species = (unk.fit_feature_arrays(m, x, y) for m in ("mahalanobis", unk.SPECIES))
    assert per_species["basis"].shape == (2 * unk.SPECIES_RANK, 16) and per_species["variances"].shape == (2, 16)
    # The shared covariance treats both stretched axes alike: it cannot tell the odd photos (AUROC about 0.5).
    assert unk.auroc(unk.feature_score("mahalanobis", own, shared), unk.feature_score("mahalanobis", odd, shared)) < 0.65
    assert unk.auroc(unk.feature_score(unk.SPECIES, own, per_species),
                     unk.feature_score(unk.SPECIES, odd, per_species)) > 0.8


@pytest.mark.parametrize("photos", [1, 2, 3])
def test_a_species_of_few_photos_borrows_the_shared_covariance(photos):
    """One or two photos span no direction of their own (their Ledoit-Wolf covariance is nearly 0):
    alone, they would call every fresh photo of their species unknown. Mixed with the shared covariance
    (the weight of SPECIES_PRIOR photos), fresh photos of it score about as under the shared one, and
    a species of 3 photos stays within a factor 2 of it."""
    x, y, own, _ = stretched_species(np.random.default_rng(31))
    away = np.eye(16)[4] * 30  # a third species, shaped like species 0, somewhere else
    xs, ys = np.concatenate([x, x[:photos] + away]), np.r_[y, [2] * photos]
    fresh = own[:100] + away
    shared = unk.fit_feature_arrays("mahalanobis", xs, ys)
    per_species = unk.fit_feature_arrays(unk.SPECIES, xs, ys)
    assert np.isfinite(per_species["variances"]).all() and (per_species["rest"] > 0).all()
    ratio = np.median(unk.feature_score(unk.SPECIES, fresh, per_species) / unk.feature_score("mahalanobis", fresh, shared))
    alone = unk._per_species(unk._unit(xs).astype(np.float64), ys, shared, prior=0)  # without the shared part
    ratio_alone = np.median(unk.feature_score(unk.SPECIES, fresh, alone)
                            / unk.feature_score("mahalanobis", fresh, shared))
    if photos < 3:
        assert 0.8 < ratio < 1.25 and ratio_alone > 5
    else:
        assert 0.5 < ratio < 2


def dense_species_distance(x: np.ndarray, y: np.ndarray, probe: np.ndarray, *, max_rank: int) -> np.ndarray:
    """mahalanobis_species by dense (D, D) matrices: each species' Ledoit-Wolf covariance mixed with the
    shared one, its top SPECIES_RANK eigenpairs kept and the mean of the other eigenvalues for the rest."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    p = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    d = x.shape[1]
    shared = unk.fit_feature_arrays("mahalanobis", x, y, max_rank=max_rank)
    b, rest = shared["basis"].astype(np.float64), float(shared["rest"])
    target = rest * np.eye(d) + b.T @ np.diag(shared["variances"] - rest) @ b
    d2 = []
    for c in range(y.max() + 1):
        mean = u[y == c].mean(0)
        r = u[y == c] - mean
        n = len(r)
        cov = r.T @ r / n
        mu = np.trace(cov) / d
        spread = (cov ** 2).sum() - d * mu ** 2
        noise = ((np.linalg.norm(r, axis=1) ** 4).sum() / n - (cov ** 2).sum()) / n
        shrink = 1.0 if spread <= 0 else min(max(noise, 0) / spread, 1)
        a = unk.SPECIES_PRIOR / (n + unk.SPECIES_PRIOR)
        mixed = (1 - a) * ((1 - shrink) * cov + shrink * mu * np.eye(d)) + a * target
        values, vectors = np.linalg.eigh(mixed)
        k = min(unk.SPECIES_RANK, d)
        top, others = vectors[:, -k:], values[:-k].mean() if k < d else 1.0
        precision = top @ np.diag(1 / values[-k:]) @ top.T + (np.eye(d) - top @ top.T) / others
        d2.append(np.einsum("nd,de,ne->n", p - mean, precision, p - mean))
    return np.sqrt(np.min(d2, axis=0))


@pytest.mark.parametrize("dim", [80, 12])  # few photos and directions: from the (n + R, n + R) side; many: (D, D)
def test_per_species_fit_equals_the_dense_computation(dim):
    rng = np.random.default_rng(33)
    y = np.repeat([0, 1, 2], [10, 14, 3])
    x = rng.normal(size=(3, dim))[y] * 3 + rng.normal(size=(len(y), dim)) * np.linspace(2, 0.2, dim)
    probe = rng.normal(size=(3, dim))[[0, 1, 2, 0]] * 3 + rng.normal(size=(4, dim))
    arrays = unk.fit_feature_arrays(unk.SPECIES, x, y, max_rank=8)
    np.testing.assert_allclose(unk.feature_score(unk.SPECIES, probe, arrays),
                               dense_species_distance(x, y, probe, max_rank=8), rtol=2e-3)


def test_per_species_cross_fitted_scores_are_those_of_a_fit_without_the_photo():
    x, y, *_ = stretched_species(np.random.default_rng(32), n=40)
    fold = unk.stratified_folds(y, 4)
    scores = unk.cross_fitted_scores(unk.SPECIES, x, y, fold)
    held = fold == 1
    alone = unk.fit_feature_arrays(unk.SPECIES, x[~held], y[~held])
    np.testing.assert_allclose(scores[held], unk.feature_score(unk.SPECIES, x[held], alone), rtol=1e-3)


def test_per_species_arrays_whose_directions_do_not_match_the_classes_are_refused():
    d = fitted(unk.SPECIES).to_dict()
    basis = cal._decode(d["arrays"]["basis"])
    d["arrays"]["basis"] = cal._encode(basis[:-1])
    with pytest.raises(UserError, match="'arrays.basis' must hold 16 directions for each of the 4 classes"):
        cal.Calibration.from_dict(d, where="model.pth")


def test_a_shared_mahalanobis_calibration_as_earlier_versions_stored_it_scores_as_before():
    """Checkpoints and ONNX files calibrated with the shared covariance keep loading and answering the
    same, whatever the default score: the stored form written out by hand, the distance worked by hand."""
    stored = {"version": 1, "temperature": 1.5, "method": "mahalanobis", "threshold": 1.2, "rule": "by hand",
              "arrays": {"means": {"dtype": "float16", "shape": [2, 3], "data": "ADwAAAAAAAAAPAAA"},  # e0, e1
                         "basis": {"dtype": "float16", "shape": [1, 3], "data": "AAAAAAA8"},  # e2
                         "variances": {"dtype": "float16", "shape": [1], "data": "ADg="},  # 0.5
                         "rest": {"dtype": "float16", "shape": [], "data": "ADQ="}}}  # 0.25
    c = cal.Calibration.from_dict(stored, num_classes=2, feature_dim=3)
    # (1, 0, 1) / sqrt 2 to class 0's mean: |x - m|^2 = 2 - sqrt 2, over rest 0.25, plus 0.5 (1 / 0.5 - 1 / 0.25)
    # along e2; class 1's is farther (7).
    d2 = (2 - np.sqrt(2)) / 0.25 - 1
    assessed = c.assess(np.zeros((2, 2)), np.array([[1.0, 0, 1], [0, 0, 1]]))
    assert assessed.scores[0] == pytest.approx(np.sqrt(d2), rel=1e-4)  # 1.159: kept
    assert list(assessed.unknown) == [False, True]  # (0, 0, 1): sqrt(8 - 2) = 2.45 from both
