""""Not one of my species": the unknown scores, fitting what they need, choosing a threshold and
measuring how well it works. numpy only (scipy's eigen solver is imported where a fit needs it), so
the torch-free ONNX app scores photos with this same code.

Scores: higher means less like the training species. From the logits: 1 - maximum softmax
probability ("msp"), energy (-T logsumexp(logits / T)), minus the largest logit ("max_logit"). From
the backbone's features: Mahalanobis distance to the nearest class mean under one shared, shrunk
covariance ("mahalanobis") or under each species' own, shrunk towards the shared one
("mahalanobis_species"), cosine distance to the nearest class mean ("cosine") or to the k-th
nearest training photo ("knn"). Both ("near_far"): the top-two logit gap per predicted class for
other species, or Mahalanobis for non-flowers, each with its own cut. Unknown: score > threshold.
Which part fired does not tell the kinds apart reliably (27% of other species refused by the far part).

Cross-fitting: the species photos are dealt into folds (`stratified_folds`), and each photo is
scored by a fit on the other folds alone (`cross_fitted_scores`), so that it scores as an unseen
photo would. For Mahalanobis the folds share one scatter matrix, downdated per fold, and each fit
takes only the top MAX_RANK eigenvectors of its covariance; per species, the top SPECIES_RANK of
each species' own.

The near_far score's own parts (its standardized logit gap and its two cuts) are in `near_far.py`.
"""
from __future__ import annotations

import math

import numpy as np

from .config import KEEP, UNKNOWN_SCORES as METHODS  # KEEP: default share of species photos kept
from .errors import UserError

LOGIT_METHODS, FEATURE_METHODS = METHODS[:3], METHODS[3:]  # "near_far" needs both, and counts as a feature score
NEAR_FAR = "near_far"
SPECIES = "mahalanobis_species"  # Mahalanobis with one covariance per species

MAX_RANK = 64  # covariance directions kept for Mahalanobis; the rest share one variance
# mahalanobis_species: directions kept per species (leaving each species out, own covariances alone:
# ranks 4 / 16 / 64 gave AUROC 0.755 / 0.778 / 0.788 for the species left out; 16 stores a quarter of
# 64's bytes), and the weight of the shared covariance in each species' own, in photos (a species of
# 1-3 photos is mostly the shared covariance, one of 400 mostly its own). On flower_photos_2k's
# 300-450 photos a species, weights of 0 / 4 / 16 photos gave AUROC 0.778 / 0.777 / 0.776.
SPECIES_RANK = 16
SPECIES_PRIOR = 16
KNN_K = 5
CROSS_FOLDS = 5  # folds of the cross-fitting: each fit sees 80% of the species photos (measured as good as 10)


# ---------------------------------------------------------------- scores from the logits

def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) log softmax(logits / temperature), in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) probabilities of softmax(logits / temperature)."""
    return np.exp(log_softmax(logits, temperature))


def logit_score(method: str, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N,) scores by "msp", "energy" or "max_logit"."""
    logits = np.asarray(logits, dtype=np.float64)
    if method == "msp":
        return 1.0 - softmax(logits, temperature).max(1)
    if method == "energy":
        z = logits / temperature
        top = z.max(1)
        return -temperature * (top + np.log(np.exp(z - top[:, None]).sum(1)))
    if method == "max_logit":
        return -logits.max(1)
    raise ValueError(f"not a logit score: {method}")


# ---------------------------------------------------------------- scores from the features

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)  # float32 squares overflow for features past ~1e19
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _class_means(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=classes)
    if (counts == 0).any():
        raise UserError(f"class {int(np.argmin(counts))} has no training features to describe it")
    means = np.zeros((classes, x.shape[1]))
    np.add.at(means, labels, x)
    return means / counts[:, None]


def as_stored(value):
    """`value` (an array, or a dict of them) at the precision a saved calibration keeps its arrays
    (`calibration.Calibration.to_dict`): floats as float16 values in float32, integers as int64. A
    score fitted on these scores photos as the saved checkpoint will."""
    if isinstance(value, dict):
        return {name: as_stored(a) for name, a in value.items()}
    value = np.asarray(value)
    return value.astype(np.int64) if value.dtype.kind == "i" else value.astype(np.float16).astype(np.float32)


def fit_feature_arrays(method: str, features: np.ndarray, labels: np.ndarray, *,
                       max_rank: int = MAX_RANK, k: int = KNN_K) -> dict[str, np.ndarray]:
    """What a feature score needs, from the training photos' features (N, D) and labels (N,).

    All on unit-length features. mahalanobis: class means (C, D); the shared within-class covariance,
    shrunk towards a multiple of the identity by the Ledoit-Wolf rule, kept as its top `max_rank`
    directions (R, D) with their variances (R,) and one variance for all other directions ("rest").
    mahalanobis_species: the same per species (`_per_species`): class means (C, D), directions
    (C * SPECIES_RANK, D), class after class, variances (C, SPECIES_RANK), rest (C,). cosine: unit
    class means (C, D). knn: the unit training features (N, D) and k. float32 (int for k).
    """
    # On the unit sphere: what a photo shows lies in its features' direction more than in their length
    # (measured on the sample: Mahalanobis AUROC 0.85 on raw features, 0.99 on unit ones).
    if features is None or labels is None:
        raise ValueError(f"the {method} score needs the training split's features and labels")
    x, labels = _unit(features).astype(np.float64), np.asarray(labels)
    means = _class_means(x, labels)
    if method == "cosine":
        arrays = {"directions": _unit(means)}
    elif method == "knn":
        arrays = {"bank": x, "k": np.array(min(k, len(x)))}
    elif method in ("mahalanobis", SPECIES):
        r = x - means[labels]
        small = len(r) < r.shape[1]  # the (N, N) Gram matrix is the smaller one: its eigenvectors map back
        arrays = {"means": means, **_shrunk_covariance(r @ r.T if small else r.T @ r, len(r), r.shape[1],
                                                       (r ** 2).sum(1), max_rank, rows=r if small else None)}
        if method == SPECIES:
            arrays = _per_species(x, labels, arrays)
    else:
        raise ValueError(f"not a feature score: {method}")
    return {name: a if a.dtype.kind == "i" else a.astype(np.float32) for name, a in arrays.items()}


def _top_eigen(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The `rank` largest eigenvalues (largest first) and their eigenvectors (columns) of a symmetric matrix."""
    from scipy.linalg import eigh  # here: prediction never fits, and scipy costs start-up time

    m = len(matrix)
    if rank <= 0:
        return np.zeros(0), np.zeros((m, 0))
    # float32: the top eigenpairs to ~1e-7 of the largest eigenvalue, in about half float64's time.
    values, vectors = eigh(matrix.astype(np.float32), subset_by_index=[m - rank, m - 1], driver="evx")
    return values[::-1].astype(np.float64), vectors[:, ::-1].astype(np.float64)


def _ledoit_wolf(scatter: np.ndarray, n: int, d: int, sq_norms: np.ndarray) -> tuple[float, float]:
    """(shrinkage, mu): the Ledoit-Wolf weight of the target mu I, mu the mean variance, for the covariance
    of n residual rows of dimension d, from their scatter R'R or Gram matrix RR' and squared lengths."""
    eig_sq = float((scatter ** 2).sum()) / n ** 2  # |S|_F^2: the same for R'R and RR'
    mu = np.trace(scatter) / n / d  # the identity target's scale: the mean variance
    # The shrinkage that minimises the expected squared error to the true covariance.
    spread = eig_sq - d * mu ** 2  # |S - mu I|^2
    noise = ((sq_norms ** 2).sum() / n - eig_sq) / n
    return (1.0 if spread <= 0 else min(max(noise, 0.0) / spread, 1.0)), mu


def _shrunk_covariance(scatter: np.ndarray, n: int, d: int, sq_norms: np.ndarray, max_rank: int, *,
                       rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The shrunk covariance of n residual rows of dimension d, from their scatter: R'R (d, d), or the
    Gram matrix RR' (n, n) when `rows` (R itself) is given; `sq_norms`: each row's squared length.

    Only the top eigenpairs are computed: the Ledoit-Wolf shrinkage needs the spectrum's sum (the
    trace) and the sum of its squares (the squared Frobenius norm), both of which the matrix gives."""
    eig_sum = np.trace(scatter) / n  # the covariance's eigenvalues sum (at most min(N, D) nonzero)
    shrink, mu = _ledoit_wolf(scatter, n, d, sq_norms)
    rank = min(max_rank, len(scatter))
    values, vectors = _top_eigen(scatter, rank)
    values = np.maximum(values, 0.0)
    if rows is not None:
        vectors = _from_gram(rows, vectors)
    eig = values / n
    kept = (1 - shrink) * eig + shrink * mu
    rest = (1 - shrink) * max(eig_sum - eig.sum(), 0.0) / max(d - rank, 1) + shrink * mu
    # No shrinkage and no variance left (N <= R, or one photo per class): keep it invertible, also once
    # stored as float16 (whose smallest positive value is 6e-8).
    rest = max(rest, 1e-6 * mu, 1e-7)
    return {"basis": vectors.T, "variances": np.maximum(kept, rest), "rest": np.array(rest)}


def _from_gram(rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Eigenvectors u (N, K) of the Gram matrix RR' of `rows` R (N, D) -> those of R'R (D, K): R'u / |R'u|."""
    vectors = rows.T @ vectors
    return vectors / np.maximum(np.linalg.norm(vectors, axis=0, keepdims=True), 1e-300)


def _per_species(x: np.ndarray, labels: np.ndarray, shared: dict[str, np.ndarray], *, rank: int = SPECIES_RANK,
                 prior: float = SPECIES_PRIOR) -> dict[str, np.ndarray]:
    """mahalanobis_species' arrays from unit features x (N, D), labels (N,) and the shared fit (class
    means and `_shrunk_covariance`'s arrays). Species c's covariance is its n photos' own, shrunk
    towards a multiple of the identity by the Ledoit-Wolf rule as the shared one is,
    (1 - s) S_c + s mu_c I, then mixed with the shared covariance S with the weight of `prior` photos:
    (1 - a) (own) + a S, a = prior / (n + prior); kept as its top `rank` directions and one variance
    for all others. With S = rest I + L'L, L = sqrt(variances - rest) * basis (R0, D), that is
    iso I + U'U, U = [sqrt((1 - a) (1 - s) / n) R_c; sqrt(a) L] (n + R0 rows, R_c the residuals):
    the eigenpairs of U'U come from the smaller of U'U and UU', as for the shared fit."""
    means, shared_rest = shared["means"], float(shared["rest"])
    classes, d = means.shape
    lift = np.sqrt(np.maximum(shared["variances"] - shared_rest, 0.0))[:, None] * shared["basis"]  # (R0, D)
    basis, variances, rest = np.zeros((classes, rank, d)), np.zeros((classes, rank)), np.zeros(classes)
    for c in range(classes):
        r = x[labels == c] - means[c]
        n, a = len(r), prior / (len(r) + prior)
        small = n + len(lift) < d
        scatter = r @ r.T if small else r.T @ r  # same trace and Frobenius norm either way
        shrink, mu = _ledoit_wolf(scatter, n, d, (r ** 2).sum(1))
        w, v = np.sqrt((1 - a) * (1 - shrink) / n), np.sqrt(a)
        u = np.concatenate([w * r, v * lift])  # (n + R0, D)
        if small:  # U U' from R R' and the cross terms
            cross = w * v * (r @ lift.T)
            product = np.block([[w * w * scatter, cross], [cross.T, a * lift @ lift.T]])
        else:
            product = w * w * scatter + a * lift.T @ lift
        k = min(rank, len(product))
        values, vectors = _top_eigen(product, k)
        values = np.maximum(values, 0.0)
        iso = (1 - a) * shrink * mu + a * shared_rest
        # The variance left outside the kept directions, spread evenly over them (floored as the shared one's).
        rest[c] = max(iso + max(np.trace(product) - values.sum(), 0.0) / max(d - k, 1), 1e-7)
        basis[c, :k] = (_from_gram(u, vectors) if small else vectors).T
        variances[c] = rest[c]  # directions past k (a species of few photos): zero rows, plain rest
        variances[c, :k] = np.maximum(iso + values, rest[c])
    return {"means": means, "basis": basis.reshape(classes * rank, d), "variances": variances, "rest": rest}


def feature_score(method: str, features: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(N, D) features -> (N,) scores by "mahalanobis", "mahalanobis_species", "cosine" or "knn" (see
    `fit_feature_arrays`)."""
    x = _unit(features).astype(np.float64 if method in ("mahalanobis", SPECIES) else np.float32)
    if method == "cosine":
        return 1.0 - (x @ arrays["directions"].T).max(1)
    if method == "knn":
        similarity = x @ arrays["bank"].T  # (N, M)
        k = int(arrays["k"])
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]
    if method in ("mahalanobis", SPECIES):
        means, basis, variances, rest = (arrays[name] for name in ("means", "basis", "variances", "rest"))
        # |x - m|^2 / rest, corrected along the kept directions: (x-m)' P (x-m) without a (D, D) matrix.
        sq = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]  # (N, C)
        if method == "mahalanobis":  # one set of directions (R, D) for every class
            proj = (x @ basis.T)[:, None, :] - (means @ basis.T)[None]  # (N, C, R)
            d2 = sq / rest + (proj ** 2 @ (1 / variances - 1 / rest))
        else:  # each class its own directions (C * R, D), variances (C, R), rest (C,)
            (classes, rank), d = variances.shape, means.shape[1]
            own = np.einsum("cd,crd->cr", means, basis.reshape(classes, rank, d))  # each mean on its class's directions
            proj = (x @ basis.T).reshape(len(x), classes, rank) - own[None]  # (N, C, R)
            d2 = sq / rest + (proj ** 2 * (1 / variances - 1 / rest[:, None])).sum(2)
        return np.sqrt(np.maximum(d2.min(1), 0.0))
    raise ValueError(f"not a feature score: {method}")


# ---------------------------------------------------------------- cross-fitting

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
    if method in ("mahalanobis", SPECIES):
        fits = _mahalanobis_per_fold(features, labels, fold, max_rank)
    for k in np.unique(fold):
        rest, held = fold != k, (fold == k) & inside
        if not held.any():
            continue
        # A fit's class indices are those of the classes it has: the score is a minimum over classes.
        _, dense = np.unique(labels[rest], return_inverse=True)
        if method == "mahalanobis":
            arrays = fits(k)
        elif method == SPECIES:  # each species' own covariance, shrunk towards this fold's shared one
            arrays = _per_species(_unit(features[rest]).astype(np.float64), dense, fits(k))
        else:
            arrays = fit_feature_arrays(method, features[rest], dense, max_rank=max_rank)
        scores[held] = feature_score(method, features[held], arrays)
    return scores


def _mahalanobis_per_fold(features: np.ndarray, labels: np.ndarray, fold: np.ndarray, max_rank: int):
    """fits(k): the Mahalanobis arrays of the photos outside fold k, as `fit_feature_arrays` makes
    them, from one scatter matrix of all photos downdated by fold k's (one eigen-decomposition per fold).

    The residuals of the photos outside fold k about their class means m_c give the scatter
    sum x x' - sum_c n_c m_c m_c' over those photos: the whole scatter minus fold k's, less the means'."""
    x = _unit(features).astype(np.float64)
    n, d = x.shape
    small = n < d  # few photos: work on the (N, N) Gram matrix instead of the (D, D) scatter
    whole = x @ x.T if small else x.T @ x
    per_fold = {} if small else {k: x[fold == k].T @ x[fold == k] for k in np.unique(fold)}
    sq = (x ** 2).sum(1)

    def fits(k) -> dict[str, np.ndarray]:
        rest = fold != k
        _, dense = np.unique(labels[rest], return_inverse=True)
        xr = x[rest]
        means = _class_means(xr, dense)
        counts = np.bincount(dense)
        # each row's squared distance to its class mean: |x|^2 - 2 x.m + |m|^2
        sq_norms = sq[rest] - 2 * np.einsum("nd,nd->n", xr, means[dense]) + (means ** 2).sum(1)[dense]
        if small:
            r = xr - means[dense]
            scatter, rows = r @ r.T, r  # (n, n): no cheaper than building it from `whole`
        else:
            scatter = whole - per_fold[k] - (means.T * counts) @ means  # sum x x' - sum_c n_c m_c m_c'
            rows = None
        arrays = {"means": means, **_shrunk_covariance(scatter, len(xr), d, np.maximum(sq_norms, 0.0), max_rank,
                                                       rows=rows)}
        return {name: a.astype(np.float32) for name, a in arrays.items()}
    return fits


# ---------------------------------------------------------------- thresholds and how well they work

def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy's rankdata, without scipy)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2  # mean of ranks start+1 .. end
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """The chance that an unknown photo scores above a known one (ties count half): Mann-Whitney U."""
    known, unknown = np.ravel(known_scores), np.ravel(unknown_scores)
    if len(known) == 0 or len(unknown) == 0:
        raise ValueError("AUROC needs scores of both kinds")
    ranks = _average_ranks(np.concatenate([known, unknown]))
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
