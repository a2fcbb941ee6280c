"""Fitting a head's calibration on its photo folder: the torch side of `calibration`, shared by
train.py (once training ends) and the `calibrate` command (on an existing checkpoint).

The temperature and the threshold come from the species photos of the train and valid splits
(centre crops, as the feature cache stores them), cross-fitted: each photo's logits from a head
trained as the checkpoint's was on the other folds, its feature score from class means and
covariance fitted without it (`calibration.fit_calibration`); with `negatives` (a folder of photos
that are none of the species) the threshold is chosen with them too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import Backbone, get_spec
from . import devices
from .calibration import Calibration, fit_calibration
from .unknown import CROSS_FOLDS, stratified_folds
from .config import TrainConfig
from .data import FlowerFolder, epoch_seed, split_dir
from .errors import UserError
from .features import FeatureStore, cached_features, centre_view
from .images import list_photos
from .model import build_head
from .training import head_threads, loss_weights, make_optimizer


@dataclass
class CalibrationData:
    """Centre-crop features (N, D) float32 and labels (N,) of the train and valid splits, and of the
    negatives when given."""

    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    negatives: np.ndarray | None = None
    negatives_dir: Path | None = None


def negative_photos(folder: str | Path, *, option: str = "--negatives") -> list[Path]:
    """The photos of a folder of non-species photos; refused in one line when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option} {folder}: no such directory; pass a folder of photos that are none of the species")
    photos = list_photos(folder)
    if not photos:
        raise UserError(f"{option} {folder} holds no photos; pass a folder of photos that are none of the species")
    return photos


def calibration_data(data_dir: str | Path, classes: list[str], backbone: Backbone, *,
                     negatives: str | Path | None = None, cache_dir: str | Path | None = None,
                     device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                     engine: str = "torch", skip=(), splits: dict | None = None) -> CalibrationData:
    """The features calibration needs. `skip`: photos already found unreadable (not read, nor warned
    about, again); `splits`: the train and valid (features, labels) when the caller has them already."""
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
                           Path(negatives) if negatives is not None else None)


@torch.inference_mode()
def head_logits(head_state: dict, hidden_units, num_classes: int, features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, num_classes) logits of the head with `head_state`."""
    head = build_head(features.shape[1], hidden_units, num_classes, 0.0)
    head.load_state_dict(head_state)
    return head.eval()(torch.from_numpy(features).float()).numpy()


def cross_fitted_logits(config: TrainConfig, epochs: int, features: np.ndarray, labels: np.ndarray,
                        num_classes: int, fold: np.ndarray) -> np.ndarray:
    """(N, num_classes) logits, each photo's from a head trained as `config` says, for `epochs` epochs
    (the checkpoint's: a head stopped at its best epoch is less sure than one run to the end), on
    the other folds of `fold` (N,). Seconds on cached features; in one process, even under torchrun."""
    logits = np.zeros((len(labels), num_classes), dtype=np.float32)
    dims = [features.shape[1], *config.hidden_units, num_classes]
    # fork_rng: the seeds set here leave torch's global random state as the caller had it.
    with devices.threads(head_threads(dims, config.batch_size)), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        for k in np.unique(fold):
            rest = fold != k
            x, y = torch.from_numpy(features[rest]).float(), torch.from_numpy(labels[rest])
            seed = config.seed + int(k)
            torch.manual_seed(seed)
            head = build_head(features.shape[1], config.hidden_units, num_classes, config.dropout).train()
            optimizer = make_optimizer(head, config)
            loss_fn = torch.nn.CrossEntropyLoss(weight=loss_weights(config, y, num_classes),
                                                label_smoothing=config.label_smoothing)
            for epoch in range(1, epochs + 1):
                torch.manual_seed(epoch_seed(seed, epoch))  # this epoch's order and dropout
                order = torch.randperm(len(y))
                for batch in order.split(config.batch_size):
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn(head(x[batch]), y[batch]).backward()
                    optimizer.step()
            with torch.inference_mode():
                logits[fold == k] = head.eval()(torch.from_numpy(features[fold == k]).float()).numpy()
    return logits


def calibrate_head(head_state: dict, config: TrainConfig, classes: list[str], data: CalibrationData, *,
                   method: str, keep: float, epochs: int = 0) -> Calibration:
    """The calibration of the head with `head_state`, trained with `config` for `epochs` epochs (0:
    config.epochs), on `data`: cross-fitted over train and valid (see the module docstring); the head
    itself scores only the negatives."""
    x = np.concatenate([data.train[0], data.valid[0]])
    y = np.concatenate([data.train[1], data.valid[1]]).astype(np.int64)
    fold = stratified_folds(y, CROSS_FOLDS, seed=config.seed)
    logits = cross_fitted_logits(config, epochs or config.epochs, x, y, len(classes), fold)
    negatives = data.negatives
    negative_logits = (None if negatives is None
                       else head_logits(head_state, config.hidden_units, len(classes), negatives))
    return fit_calibration(logits, y, fold, method=method, features=x, keep=keep,
                           negative_logits=negative_logits, negative_features=negatives)


@torch.no_grad()
def through_top(data: CalibrationData, top: torch.nn.Module, shape, *, device: torch.device | str = "cpu",
                batch_size: int = 256) -> CalibrationData:
    """`data` as the head of a fine-tuned checkpoint sees it: each split's activation rows (N, prod(shape))
    through the top blocks `top` (in eval mode, as trained), in batches -> features (N, D)."""
    top = top.eval().to(device)

    def features(rows: np.ndarray | None) -> np.ndarray | None:
        if rows is None:
            return None
        parts = [top(torch.from_numpy(rows[i:i + batch_size]).to(device).view(-1, *shape)).float().cpu().numpy()
                 for i in range(0, len(rows), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    return dataclasses.replace(data, train=(features(data.train[0]), data.train[1]),
                               valid=(features(data.valid[0]), data.valid[1]), negatives=features(data.negatives))


def calibrate_checkpoint(ckpt, classes: list[str], data: CalibrationData, *, method: str, keep: float,
                         top: torch.nn.Module | None = None,
                         device: torch.device | str = "cpu") -> tuple[Calibration, CalibrationData]:
    """The calibration of one checkpoint (see `calibrate_head`). `data` holds what
    the frozen part gives (`backbones.frozen_part` at the checkpoint's --finetune): the features, or for
    a fine-tuned checkpoint the activations, which go through its blocks (`top`, `split_backbone`'s,
    loaded here with the checkpoint's weights) first. Returns it and the features it was fitted on."""
    if ckpt.config.finetune:
        top.load_state_dict(ckpt.top_state)
        data = through_top(data, top, get_spec(ckpt.arch).split_shapes[ckpt.config.finetune], device=device)
    calibration = calibrate_head(ckpt.head_state, ckpt.config, classes, data, method=method, keep=keep,
                                 epochs=ckpt.epoch)
    return calibration, data


def describe(calibration: Calibration, data: CalibrationData) -> str:
    """The one line saying what was chosen, and on what."""
    on = (f"{len(data.train[1]) + len(data.valid[1])} train+valid photos (cross-fitted in {CROSS_FOLDS} folds)"
          + (f" and {len(data.negatives)} photos of {data.negatives_dir}"
             if data.negatives is not None else ""))
    return f"Calibrated on {on}: {calibration.summary()}"
