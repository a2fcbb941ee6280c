"""Fitting a head's calibration on its photo folder: the torch side of `calibration`, used by the
run (`training`, once for the checkpoint a user loads) and by the `calibrate` command.

Which photos: when the valid split holds at least `VALID_ONLY_PER_CLASS` photos of every species,
the head's own logits of them (photos it never trained on) fit the temperature and choose the threshold,
and a feature score's statistics are fitted on the train split alone: no fold heads, so calibrating
costs one pass of the head over the valid photos and one feature fit. With fewer valid photos (a
threshold keeping 95% of 50 photos rests on two or three of them), the temperature and the threshold
come from the species photos of the train and valid splits, cross-fitted: each photo's logits from a
head trained as the checkpoint's was on the other folds (its recipe: the same loop, augmented views,
schedule, for the checkpoint's own epoch count), its feature score from class means and covariance
fitted without it (`calibration.fit_calibration`); with `negatives` (a folder of photos that are none
of the species) the threshold is chosen with them too. The fold heads train all at once
(`model.StackedHeads`), through `fitting.train_one_epoch`. The near_far score's cuts follow the same
rule (`near_far.fit_near_far_valid` or `near_far.fit_near_far`).

A checkpoint with fine-tuned blocks (`--finetune N`) is calibrated on its valid split alone, whatever
its size: its head reads features from blocks trained on every training photo, so a fold head over
those features would score "held-out" photos the blocks have seen (over-confident logits, a threshold
too tight for new photos), and fold heads over the frozen part's outputs alone would calibrate another
model than the one loaded. The valid photos are the only ones neither blocks nor head trained on: an
honest but noisier sample when small. Fold heads started from the trained head's weights, a cheaper
way, were measured and rejected: they inherit its memory of the held-out photos (docs/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import devices, distributed
from .backbones import Backbone, get_spec
from .calibration import Calibration, fit_calibration, fit_temperature
from .checkpoint import load_weights
from .config import TrainConfig
from .data import FlowerFolder, split_dir
from .datacheck import negative_photos
from .errors import UserError
from .feature_store import FeatureStore
from .features import FeatureSet, cached_features, feature_loader
from .fitting import fit_threads, loss_weights, make_optimizer, make_scheduler, new_head, seed_epoch, train_one_epoch
from .frozen_pass import centre_view
from .model import StackedHeads, build_head
from .near_far import fit_near_far_valid
from .unknown import (CROSS_FOLDS, FEATURE_METHODS, MAX_RANK, NEAR_FAR, as_stored, choose_threshold,
                      fit_feature_arrays, stratified_folds)

# Valid photos per species from which the valid split alone calibrates. 10 per species (the 300-photo
# sample) left the valid-only threshold unsteady; 35-67 per species (flower_photos_2k) matched the
# cross-fitted rule within noise (docs/benchmarks.md, "Which photos calibrate").
VALID_ONLY_PER_CLASS = 30


@dataclass
class CalibrationData:
    """Centre-crop features (N, D) float32 and labels (N,) of the train and valid splits, and of the
    negatives when given."""

    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    negatives: np.ndarray | None = None
    negatives_dir: Path | None = None
    # The training photos' augmented views (V * n, D), view after view: row j shows training photo j % n.
    views: np.ndarray | None = None


def calibration_data(data_dir: str | Path, classes: list[str], backbone: Backbone, *,
                     negatives: str | Path | None = None, cache_dir: str | Path | None = None,
                     device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                     engine: str = "torch", skip=(), splits: dict | None = None,
                     views: np.ndarray | None = None) -> CalibrationData:
    """The features calibration needs. `skip`: photos already found unreadable (not read, nor warned
    about, again); `splits`: the train and valid (features, labels) when the caller has them already,
    and `views` the training photos' augmented views (see `CalibrationData`)."""
    store = FeatureStore(cache_dir, backbone)
    common = dict(device=device, num_workers=num_workers, progress=progress, engine=engine)

    def of(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        x, ok = cached_features(backbone, paths, centre_view(backbone), store, **common)
        return x[ok].float().numpy(), ok.numpy()

    splits = dict(splits or {})
    skip = {Path(p) for p in skip}
    for split in ("train", "valid"):
        if split in splits:
            continue
        samples = [(p, y) for p, y in FlowerFolder(split_dir(data_dir, split), classes=classes).samples
                   if Path(p) not in skip]
        x, ok = of([p for p, _ in samples])
        splits[split] = (x, np.array([y for _, y in samples], dtype=np.int64)[ok])
    negative_x = of(negative_photos(negatives))[0] if negatives is not None else None
    if negative_x is not None and len(negative_x) == 0:
        raise UserError(f"--negatives {negatives}: none of its photos could be read")
    return CalibrationData(splits["train"], splits["valid"], negative_x,
                           Path(negatives) if negatives is not None else None, views)


@torch.inference_mode()
def forward(module: torch.nn.Module, rows: np.ndarray, *, shape=None, device: torch.device | str = "cpu",
            batch_size: int = 256) -> np.ndarray:
    """`module` (in eval mode) over rows (N, ...) in batches -> (N, ...) float32; `shape`: one row's
    shape as the module takes it (activations stored flat)."""
    module = module.eval().to(device)
    parts = [module(torch.from_numpy(rows[i:i + batch_size]).float().to(device).view(
        -1, *(shape or rows.shape[1:]))).float().cpu().numpy() for i in range(0, len(rows), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def head_logits(head_state: dict, hidden_units, num_classes: int, features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, num_classes) logits of the head with `head_state`."""
    head = build_head(features.shape[1], hidden_units, num_classes, 0.0)
    head.load_state_dict(head_state)
    return forward(head, features)


def fold_rows(features: np.ndarray, labels: np.ndarray, fold: np.ndarray, views: np.ndarray | None = None,
              viewed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What the fold heads train on: rows (M, D), the photos' `features` (N, D), then `views`, the
    augmented views (V * n, D) of the first n = `viewed` photos, view after view (row j shows photo j % n);
    targets (M, K), each row's label for the heads whose folds hold none of its photo, and -100 (the
    loss's ignore_index) for the head of its own fold."""
    labels = np.asarray(labels, dtype=np.int64)
    rows, photo = [features], [np.arange(len(labels))]
    if views is not None and len(views):
        if not 0 < viewed <= len(labels) or len(views) % viewed:
            raise ValueError(f"{len(views)} views are not whole passes over {viewed} photos")
        rows.append(views)
        photo.append(np.arange(len(views)) % viewed)
    photo = np.concatenate(photo)
    targets = np.repeat(labels[photo][:, None], int(fold.max()) + 1, axis=1)
    targets[np.arange(len(photo)), fold[photo]] = -100
    return np.concatenate(rows).astype(np.float32), targets


def cross_fitted_logits(config: TrainConfig, epochs: int, features: np.ndarray, labels: np.ndarray,
                        num_classes: int, fold: np.ndarray, *, views: np.ndarray | None = None, viewed: int = 0,
                        device: torch.device | str = "cpu") -> np.ndarray:
    """(N, num_classes) logits of the photos' `features` (N, D), each photo's from a head trained on
    the other folds of `fold` (N,) alone (and `views`: see `fold_rows`), as train.py trains the head:
    the same loop, optimizer, schedule (over `config.epochs`), seeds and class weights, for `epochs`
    epochs (the checkpoint's: a head stopped at its best epoch is less sure than one run to the end).
    Under torchrun every process trains its share of the rows, as for the head."""
    fold = np.asarray(fold)
    rows, targets = fold_rows(features, labels, fold, views, viewed)
    folds, dim = targets.shape[1], rows.shape[1]
    loader = feature_loader(FeatureSet(torch.from_numpy(rows), torch.from_numpy(targets)),
                            batch_size=config.batch_size, shuffle=True, seed=config.seed)
    row_labels = torch.from_numpy(targets.max(1))  # each row's label (only one of its K targets is -100)
    device = torch.device(device)
    # fork_rng: the seeds set here leave torch's global random state as the caller had it.
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), devices.threads(
            fit_threads(config, [dim, *config.hidden_units, num_classes], device, heads=folds)):
        heads = StackedHeads([new_head(config, dim, num_classes, seed=config.seed + k) for k in range(folds)])
        model = distributed.wrap(heads.to(device), device)
        optimizer = make_optimizer(heads, config)
        scheduler = make_scheduler(optimizer, config, len(loader))
        loss_fn = torch.nn.CrossEntropyLoss(weight=loss_weights(config, row_labels, num_classes),
                                            label_smoothing=config.label_smoothing)  # ignore_index -100
        for epoch in range(1, epochs + 1):
            seed_epoch(loader, config.seed, epoch)
            train_one_epoch(model, loader, optimizer, loss_fn, device, scheduler=scheduler,
                            desc=f"calibration: {folds} fold heads, epoch {epoch}/{epochs}", progress=False)
    n = len(fold)
    logits = forward(heads, rows[:n], device=device)  # (N, C, K)
    return logits[np.arange(n), :, fold]


def valid_only(data: CalibrationData, num_classes: int, *, finetune: int = 0) -> bool:
    """Whether `data` is calibrated from its valid split alone (module docstring): always for a
    checkpoint with fine-tuned blocks (`finetune`), else when the valid split is large enough."""
    if finetune:
        return True
    counts = np.bincount(np.asarray(data.valid[1], dtype=np.int64), minlength=num_classes)
    return len(counts) == num_classes and counts.min() >= VALID_ONLY_PER_CLASS


def valid_calibration(valid_logits: np.ndarray, data: CalibrationData, *, method: str, keep: float,
                      negative_logits: np.ndarray | None = None, max_rank: int = MAX_RANK,
                      seed: int = 0) -> Calibration:
    """The calibration from the head's own logits (N, C) of the valid photos: the temperature, and the
    threshold keeping `keep` of the valid photos' scores (with the negatives' when given); a feature
    score's arrays fitted on the train photos alone, so that the valid photos score as unseen ones
    (near_far: see `near_far.fit_near_far_valid`, its folds dealt with `seed`)."""
    (x, y), (xv, yv) = data.train, data.valid
    calibration = Calibration(fit_temperature(valid_logits, yv), method)
    if method == NEAR_FAR:  # its far part cross-fitted over train and valid (`fit_near_far_valid`)
        calibration.arrays, species = fit_near_far_valid(valid_logits, data.train, data.valid,
                                                         calibration.temperature, keep=keep, max_rank=max_rank,
                                                         seed=seed)
    else:
        if method in FEATURE_METHODS:
            calibration.arrays = as_stored(fit_feature_arrays(method, x, y, max_rank=max_rank))
        species = calibration.scores(valid_logits, xv)
    negatives = None if data.negatives is None else calibration.scores(negative_logits, data.negatives)
    calibration.threshold, calibration.rule = choose_threshold(species, negatives, keep=keep, of="valid photos")
    calibration.kept = float((species <= calibration.threshold).mean())
    return calibration


def calibrate_head(head_state: dict, config: TrainConfig, classes: list[str], data: CalibrationData, *,
                   method: str, keep: float, epochs: int = 0, device: torch.device | str = "cpu") -> Calibration:
    """The calibration of the head with `head_state`, trained with `config` for `epochs` epochs (0:
    config.epochs), on `data`: from the valid split alone when it is large enough, else cross-fitted
    over train and valid, the head itself then scoring only the negatives (see the module docstring)."""
    negatives = data.negatives
    negative_logits = (None if negatives is None
                       else head_logits(head_state, config.hidden_units, len(classes), negatives))
    if valid_only(data, len(classes), finetune=config.finetune):
        valid_logits = head_logits(head_state, config.hidden_units, len(classes), data.valid[0])
        with devices.blas_threads():  # the feature fits: one BLAS thread (measured, `devices.blas_threads`)
            return valid_calibration(valid_logits, data, method=method, keep=keep, negative_logits=negative_logits,
                                     seed=config.seed)
    x = np.concatenate([data.train[0], data.valid[0]])
    y = np.concatenate([data.train[1], data.valid[1]]).astype(np.int64)
    fold = stratified_folds(y, CROSS_FOLDS, seed=config.seed)
    logits = cross_fitted_logits(config, epochs or config.epochs, x, y, len(classes), fold, views=data.views,
                                 viewed=len(data.train[1]), device=device)
    with devices.blas_threads():
        return fit_calibration(logits, y, fold, method=method, features=x, keep=keep,
                               negative_logits=negative_logits, negative_features=negatives)


def through_top(data: CalibrationData, top: torch.nn.Module, shape, *,
                device: torch.device | str = "cpu") -> CalibrationData:
    """`data` as the head of a fine-tuned checkpoint sees it: each split's activation rows (N, prod(shape))
    through the top blocks `top` (in eval mode, as trained) -> features (N, D)."""
    def features(rows: np.ndarray | None) -> np.ndarray | None:
        return None if rows is None else forward(top, rows, shape=shape, device=device)

    return dataclasses.replace(data, train=(features(data.train[0]), data.train[1]),
                               valid=(features(data.valid[0]), data.valid[1]), negatives=features(data.negatives),
                               views=features(data.views))


def calibrate_checkpoint(ckpt, classes: list[str], data: CalibrationData, *, method: str, keep: float,
                         top: torch.nn.Module | None = None,
                         device: torch.device | str = "cpu") -> tuple[Calibration, CalibrationData]:
    """The calibration of one checkpoint (see `calibrate_head`), for its own epoch count. `data` holds
    what the frozen part gives (`backbones.frozen_part` at the checkpoint's --finetune): the features,
    or for a fine-tuned checkpoint the activations, which go through its blocks (`top`,
    `split_backbone`'s, loaded here with the checkpoint's weights) first. Returns it and the features
    it was fitted on."""
    if ckpt.config.finetune:
        load_weights(ckpt, None, top)
        data = through_top(data, top, get_spec(ckpt.arch).split_shapes[ckpt.config.finetune], device=device)
    calibration = calibrate_head(ckpt.head_state, ckpt.config, classes, data, method=method, keep=keep,
                                 epochs=ckpt.epoch, device=device)
    return calibration, data


def calibrated_line(calibration: Calibration, data: CalibrationData, classes: list[str], *, finetune: int = 0) -> str:
    """The one line saying what was chosen, and on what (`classes`: the checkpoint's species;
    `finetune`: its fine-tuned blocks)."""
    both = len(data.train[1]) + len(data.valid[1])
    features = (f"Mahalanobis distances of all {both} train+valid photos, cross-fitted" if calibration.method == NEAR_FAR
                else f"feature statistics from the {len(data.train[1])} train photos")
    on = (f"{len(data.valid[1])} valid photos (the head's own logits; {features})"
          if valid_only(data, len(classes), finetune=finetune)
          else f"{both} train+valid photos (cross-fitted in {CROSS_FOLDS} folds)")
    on = (on
          + (f" and {len(data.negatives)} photos of {data.negatives_dir}"
             if data.negatives is not None else ""))
    return f"Calibrated on {on}: {calibration.summary()}"
