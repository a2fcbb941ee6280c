"""Backbone features computed once: the frozen backbone never changes, so training the head on its
stored outputs gives the same model as running it every epoch, at a fraction of the cost.

Features live in memory for the run and on disk between runs, in one folder per backbone (its
name, weights and preprocessing) and one file per view (centre crop, or augmented view i) keyed by
each image file's content hash. A second run, a resumed run or a hyperparameter search reuses them;
a changed photo, backbone or preprocessing misses the cache and is recomputed. On disk and in memory
they are float16 (half the size; VGG's are 25,088 numbers per image), and batches are float32.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter() on the DataLoader twice (double work)

from . import distributed
from .backbones import Backbone
from .checkpoint import atomic_save, safe_load
from .config import TrainConfig
from .data import (EpochSampler, FlowerFolder, PhotoList, eval_transform, refuse_unreadable_categories,
                   skip_none_collate, split_dir, train_transform)
from .errors import UserError

CACHE_ENV = "FLOWER_CLASSIFIER_CACHE"  # overrides the default cache folder (tests point it at a temp dir)
CACHE_FORMAT = 1  # bump when the stored layout changes: old entries then simply miss
STORE_DTYPE = torch.float16  # on disk and in memory; the benchmark shows no accuracy cost


def default_cache_dir() -> Path:
    """$FLOWER_CLASSIFIER_CACHE, else $XDG_CACHE_HOME/flower_classifier/features (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flower_classifier" / "features"


def file_digest(path: str | Path) -> str:
    """Hash of the file's bytes: a photo edited in place gets new features, a renamed one keeps them."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def backbone_key(backbone: Backbone) -> str:
    """Names the backbone's exact function: name, preprocessing and every weight's bytes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({"format": CACHE_FORMAT, "name": backbone.name,
                         "preprocessing": backbone.preprocessing.to_dict()}, sort_keys=True).encode())
    for name, tensor in backbone.module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{backbone.name}-{h.hexdigest()}"


# ---------------------------------------------------------------- views: which transform, which randomness

@dataclass(frozen=True)
class View:
    """One way of turning every image into a tensor: the centre crop, or augmented copy number `index`."""

    name: str
    transform: Callable
    index: int = 0  # 0: deterministic centre crop; i > 0: random augmentation seeded by (i, image)

    def seed(self, digest: str) -> int | None:
        # Seeded by the image's content, not the run's seed: view i is the same picture in every run,
        # so it is computed once and shared by all runs and searches.
        return None if self.index == 0 else int(_short_hash(f"{self.index}:{digest}"), 16)

    def key(self, precision: str) -> str:
        return f"{self.name}-{precision}-{_short_hash(repr(self.transform))}"


def centre_view(backbone: Backbone) -> View:
    return View("centre", eval_transform(backbone.preprocessing))


def augmented_view(backbone: Backbone, index: int) -> View:
    return View(f"aug{index}", train_transform(backbone.preprocessing), index)


# ---------------------------------------------------------------- extraction

def precision_on(device: torch.device) -> str:
    """What the forward pass computes in: bf16 (or fp16) autocast on CUDA, float32 elsewhere."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@torch.inference_mode()
def extract_features(backbone: Backbone, paths: list[Path], view: View, *, device: torch.device | str = "cpu",
                     digests: list[str] | None = None, batch_size: int | None = None, num_workers: int = 0,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 of `paths` under `view`, and which images could be read (N,) bool.

    Batched, without autograd, with worker processes decoding images; on CUDA also channels_last
    and autocast. Under torchrun each process takes every world_size-th image and all get all rows
    (rounded to float16 on the way, as the cache stores them).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if view.index and digests is None:
        digests = [file_digest(p) for p in paths]
    seeds = [view.seed(d) for d in digests] if view.index else [None] * len(paths)
    share = distributed.my_share(len(paths))
    # Targets are positions in this share; each photo's seed fixes its augmented view.
    dataset = PhotoList([(paths[i], k) for k, i in enumerate(share)], view.transform, [seeds[i] for i in share])
    loader = DataLoader(dataset, batch_size=batch_size or (128 if cuda else 32), num_workers=num_workers,
                        collate_fn=skip_none_collate, pin_memory=cuda,
                        generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    module = backbone.module.to(device)
    if cuda:
        module = module.to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_on(device))
    amp = torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()
    features = torch.zeros(len(share), backbone.feature_dim)
    ok = torch.zeros(len(share), dtype=torch.bool)
    bar = tqdm(loader, desc=f"features ({view.name})", unit="batch", leave=False, file=sys.stderr,
               disable=not progress or not distributed.is_main())
    for batch in bar:
        if batch is None:
            continue
        images, where = batch  # (B, 3, S, S), (B,) positions in this process's share
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp:
            features[where] = module(images).float().cpu()  # (B, D)
        ok[where] = True
    if distributed.world_size() == 1:
        return features, ok
    # Gathered as stored (float16: half the traffic) and as uint8 (gloo has no bool).
    features = distributed.gather_shares(features.to(STORE_DTYPE), len(paths)).float()
    return features, distributed.gather_shares(ok.to(torch.uint8), len(paths)).bool()


# ---------------------------------------------------------------- the disk cache

class FeatureStore:
    """CACHE_DIR/<backbone key>/<view key>.pt, each {"digests": [...], "features": (N, D) float16}."""

    def __init__(self, cache_dir: str | Path | None, backbone: Backbone):
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dir = root.expanduser() / backbone_key(backbone)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--cache_dir {root}: cannot store features there ({e.strerror or e}); "
                            f"pass a writable folder") from None

    def path(self, view_key: str) -> Path:
        return self.dir / f"{view_key}.pt"

    def _read(self, view_key: str) -> tuple[list[str], torch.Tensor | None]:
        path = self.path(view_key)
        if not path.is_file():
            return [], None
        try:
            d = safe_load(path, what="feature cache")
            return list(d["digests"]), d["features"]
        except (UserError, KeyError, TypeError):
            return [], None  # a damaged cache file is only a cache miss; it is rewritten below

    def lookup(self, view_key: str, digests: list[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) float16 features and an (N,) mask of the digests found."""
        known, stored = self._read(view_key)
        row = {d: i for i, d in enumerate(known)}
        found = torch.tensor([d in row for d in digests], dtype=torch.bool)
        out = torch.zeros(len(digests), dim, dtype=STORE_DTYPE)
        if found.any() and stored is not None:
            out[found] = stored.to(STORE_DTYPE)[[row[d] for d, f in zip(digests, found) if f]]
        return out, found

    def add(self, view_key: str, digests: list[str], features: torch.Tensor) -> None:
        """Merge new rows into the view's file (written atomically; a concurrent writer may win)."""
        known, stored = self._read(view_key)
        seen = set(known)
        new = [i for i, d in enumerate(digests) if d not in seen]
        if not new:
            return
        parts = ([stored] if stored is not None else []) + [features[new].to(STORE_DTYPE)]
        atomic_save({"digests": known + [digests[i] for i in new], "features": torch.cat(parts)},
                    self.path(view_key))


@dataclass
class CacheStats:
    cached: int = 0
    computed: int = 0  # readable images run through the backbone
    seconds: float = 0.0  # spent computing (unreadable images included)


def cached_features(backbone: Backbone, paths: list[Path], view: View, store: FeatureStore | None, *,
                    device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                    stats: CacheStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float16 features of `paths` under `view` and a readable-image mask: from `store` where
    present, computed (and stored) where not. `store=None` keeps them in memory only."""
    device = torch.device(device)
    digests = [file_digest(p) for p in paths]
    key = view.key(precision_on(device))
    if store is not None:
        features, found = store.lookup(key, digests, backbone.feature_dim)
    else:
        features, found = torch.zeros(len(paths), backbone.feature_dim, dtype=STORE_DTYPE), \
            torch.zeros(len(paths), dtype=torch.bool)
    ok = found.clone()
    missing = [i for i in range(len(paths)) if not found[i]]
    if missing:
        start = time.perf_counter()
        new, readable = extract_features(backbone, [paths[i] for i in missing], view, device=device,
                                         digests=[digests[i] for i in missing], num_workers=num_workers,
                                         progress=progress)
        # Rounded to float16 now, not only on disk: the first run and a cached rerun train identically.
        features[missing] = new.to(STORE_DTYPE)
        ok[missing] = readable
        if store is not None and distributed.is_main():
            keep = [i for i, r in zip(missing, readable.tolist()) if r]
            store.add(key, [digests[i] for i in keep], features[keep])
        distributed.barrier()  # every process sees the stored file before reading the next view
        if stats is not None:
            stats.seconds += time.perf_counter() - start
    if stats is not None:
        stats.cached += int(found.sum())
        stats.computed += int(ok.sum()) - int(found.sum())  # unreadable images yield no features
    return features, ok


# ---------------------------------------------------------------- what training consumes

class FeatureSet(Dataset):
    """(features, label) rows held in memory as float16; handed out as float32 batches."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels  # (N, D) float16, (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i].float(), self.labels[i]

    def __getitems__(self, indices: list[int]):
        # The DataLoader asks for a whole batch at once: one indexing op instead of N small ones.
        idx = torch.as_tensor(indices)
        return self.features[idx].float(), self.labels[idx]


def _whole_batch(batch):
    return batch  # `__getitems__` already returns the collated (features, labels) pair


def feature_loader(dataset: FeatureSet, *, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches of cached features, in the order the classic loop takes the images (`EpochSampler`:
    from seed and epoch alone). Under torchrun the training loader gives each process its share."""
    if shuffle and distributed.world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)  # `fit` calls set_epoch
    else:
        sampler = EpochSampler(len(dataset), seed) if shuffle else None  # `fit` calls set_epoch
    # Its own generator: a DataLoader without one draws from torch's global RNG, shifting dropout.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=_whole_batch,
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class FeatureData:
    """Training and validation features of a data folder, for as many training runs as wanted."""

    train: FeatureSet
    valid: FeatureSet
    classes: list[str]
    stats: CacheStats


def load_feature_data(data_dir: str | Path, backbone: Backbone, *, augmented_views: int = 0,
                      cache_dir: str | Path | None = None, use_disk: bool = True,
                      device: torch.device | str = "cpu", num_workers: int = 0,
                      log: Callable[[str], None] = print, progress: bool = True) -> FeatureData:
    """Features of the train split (centre crop + `augmented_views` augmented copies per image) and of
    the valid split (centre crop), computed once and cached on disk under `cache_dir`."""
    train_set = FlowerFolder(split_dir(data_dir, "train"))  # used only for its file list and labels
    valid_set = FlowerFolder(split_dir(data_dir, "valid"), classes=train_set.classes)
    store = FeatureStore(cache_dir, backbone) if use_disk else None
    stats = CacheStats()
    train_paths, train_labels = [p for p, _ in train_set.samples], torch.tensor([y for _, y in train_set.samples])
    valid_paths, valid_labels = [p for p, _ in valid_set.samples], torch.tensor([y for _, y in valid_set.samples])
    common = dict(device=device, num_workers=num_workers, progress=progress, stats=stats)
    # One call for both splits' centre crops: one pass of the loader, one cache file to update.
    centre, ok = cached_features(backbone, train_paths + valid_paths, centre_view(backbone), store, **common)
    n = len(train_paths)
    xs, ys = [centre[:n][ok[:n]]], [train_labels[ok[:n]]]
    for i in range(1, augmented_views + 1):
        aug, aug_ok = cached_features(backbone, train_paths, augmented_view(backbone, i), store, **common)
        xs.append(aug[aug_ok])
        ys.append(train_labels[aug_ok])
    train = FeatureSet(torch.cat(xs), torch.cat(ys))
    valid = FeatureSet(centre[n:][ok[n:]], valid_labels[ok[n:]])
    # The head must not train on a category none of whose photos could be read.
    refuse_unreadable_categories(train_set.root, train_set.classes, set(train_labels[ok[:n]].tolist()))
    if len(train) == 0 or len(valid) == 0:
        raise UserError(f"no {'training' if len(train) == 0 else 'validation'} image of {data_dir} could be read")
    unreadable = int((~ok).sum())
    if unreadable:
        log(f"skipped {unreadable} unreadable images (each named in a warning above)")
    where = f" (cache: {store.dir})" if store else ""
    rate = f", {stats.computed / stats.seconds:.1f} images/s" if stats.seconds else ""
    log(f"Features: {stats.computed} computed in {stats.seconds:.1f} s{rate}, {stats.cached} from the "
        f"cache{where}; {len(train)} training rows (centre crop + {augmented_views} augmented views per image), "
        f"{len(valid)} validation rows")
    return FeatureData(train, valid, train_set.classes, stats)


def cached_training_data(config: TrainConfig, data_dir: str | Path, backbone: Backbone, *,
                         device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                         progress: bool = True, cache_dir: str | Path | None = None):
    """What `training.run_training` needs on the cached path: (train_loader, valid_loader, classes)."""
    views = config.augmented_views if config.augment else 0  # --no_augment: centre crops only
    if config.augmented_views and not config.augment:
        log(f"--no_augment: ignoring --augmented_views {config.augmented_views}")
    data = load_feature_data(data_dir, backbone, augmented_views=views, cache_dir=cache_dir, device=device,
                             num_workers=config.num_workers, log=log, progress=progress)
    train_loader = feature_loader(data.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    valid_loader = feature_loader(data.valid, batch_size=max(config.batch_size, 256), shuffle=False)
    return train_loader, valid_loader, data.classes
