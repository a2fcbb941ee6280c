"""Features for training: each photo's frozen-backbone rows, found in the store or computed and
stored as the pass goes, joined into the datasets the head trains on.

`cached_rows` is where the store (`feature_store`) meets the frozen pass (`frozen_pass`): rows
already stored are memory-mapped, the rest computed and written a piece (a few batches) at a time,
so a killed pass keeps what it computed. Training reads a `FeatureSet` over the memory-mapped
shards: each batch reads only its own rows from disk (through the page cache), so a data set whose
features exceed RAM still trains. Without a disk store (or on a full disk) they stay in memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed
from .backbones import Backbone
from .config import TrainConfig
from .data import EpochSampler, FlowerFolder, refuse_unreadable_categories, split_dir
from .errors import UserError
from .feature_store import CacheStats, FeatureStore, Rows, check_room, file_digest, stored
from .frozen_pass import (View, augmented_view, centre_view, frozen_pass, precision_on, resolve_engine,
                          usable_engine, view_seeds)

PIECE_BYTES = 32 << 20  # a feature pass writes a shard every this many bytes of rows...
PIECE_ROWS = 2048  # ...or rows, whichever comes first: a killed pass keeps all but the last piece


# ---------------------------------------------------------------- found or computed, and stored

def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _from_main(mask: torch.Tensor) -> torch.Tensor:
    """Process 0's copy of a bool mask, so that every process splits the same work."""
    if distributed.world_size() == 1:
        return mask
    import torch.distributed as dist

    shared = mask.to(_comm_device(), torch.uint8)
    dist.broadcast(shared, 0)
    return shared.cpu().bool()


def cached_rows(backbone: Backbone, paths: list[Path], view: View, store: FeatureStore | None, *,
                device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                stats: CacheStats | None = None, engine: str = "torch",
                digests: list[str] | None = None) -> tuple[Rows, torch.Tensor]:
    """Features of `paths` under `view` (float16 `Rows`: memory-mapped from `store` where stored) and
    a readable-image mask. Rows not in the store are computed and written to it in pieces as the pass
    goes; under torchrun each process computes and writes its share, then all read the union.
    `store=None` keeps them in memory only. `digests`: the files' (`file_digest`), if known."""
    device = torch.device(device)
    engine = resolve_engine(engine, device)
    digests = digests if digests is not None else [file_digest(p) for p in paths]
    for attempt in dict.fromkeys([engine, "torch"]):  # ONNX, unless the backbone does not export
        key = view.key(precision_on(device, attempt))
        if store is not None:
            rows, found = store.lookup(key, digests)
            found = _from_main(found)
        else:
            rows, found = Rows.absent(len(paths), backbone.feature_dim), torch.zeros(len(paths), dtype=torch.bool)
        missing = [i for i in range(len(paths)) if not found[i]]
        engine = attempt
        if not missing or usable_engine(backbone, attempt, device, num_workers, store and store.dir) == attempt:
            break
    if stats is not None:  # torch if it computed any of them (a backbone that does not export)
        stats.engine = "torch" if "torch" in (engine, stats.engine) else engine
    if not missing:
        if stats is not None:
            stats.cached += len(paths)
        return rows, found
    start = time.perf_counter()
    share = [missing[j] for j in distributed.my_share(len(missing))]
    seeds = view_seeds(view, [paths[i] for i in share], [digests[i] for i in share])
    in_memory = []  # (positions, float16 rows) that are not in the store
    readable = torch.zeros(len(paths), dtype=torch.bool)
    piece_rows = max(1, min(PIECE_ROWS, PIECE_BYTES // (backbone.feature_dim * 2)))
    piece: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush():
        where = torch.cat([w for w, _ in piece])
        # Rounded now, to what the store keeps: a cached rerun trains identically.
        block = stored(torch.cat([f for _, f in piece]))
        piece.clear()
        finite = torch.isfinite(block).all(dim=1)  # a non-finite row is never stored (it would read as damage)
        if store is not None and finite.any() and store.add(key, [digests[i] for i in where[finite].tolist()],
                                                            block[finite].numpy()):
            where, block = where[~finite], block[~finite]
        if len(where):
            in_memory.append((where, block))

    for where, batch in frozen_pass(backbone, [paths[i] for i in share], view, device=device, seeds=seeds,
                                 batch_size=None, num_workers=num_workers, progress=progress, engine=engine,
                                 cache_folder=store and store.dir):
        positions = torch.as_tensor(share)[where]
        readable[positions] = True
        piece.append((positions, batch))
        if sum(len(w) for w, _ in piece) >= piece_rows:
            flush()
    if piece:
        flush()
    if distributed.world_size() > 1:
        new, readable = _union(store, key, digests, missing, share, readable, in_memory, backbone.feature_dim)
    else:
        if store is not None:
            store.compact(key)
        new = _memory(in_memory, len(paths))  # rows not stored come first: the store may hold an older copy
        if store is not None:
            new.append(store.lookup(key, [digests[i] for i in missing])[0].placed(missing, len(paths)))
    rows = _first_of_each(Rows.cat([rows, *new]), len(paths))
    ok = found | readable
    if stats is not None:
        stats.seconds += time.perf_counter() - start
        stats.cached += int(found.sum())
        stats.computed += int(ok.sum()) - int(found.sum())  # unreadable images yield no features
    if distributed.world_size() > 1 and store is not None and distributed.is_main():
        store.compact(key)  # one process tidies, after all have read
    return rows, ok


def _memory(blocks: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[Rows]:
    return [Rows.of(block).placed(where.tolist(), n) for where, block in blocks]


def _first_of_each(parts: Rows, n: int) -> Rows:
    """Rows.cat of k n-long parts -> n rows, taking for each position the first part that has it."""
    source, row = parts.source.reshape(-1, n), parts.row.reshape(-1, n)
    first = np.argmax(source >= 0, axis=0)
    return Rows(parts.arrays, source[first, np.arange(n)], row[first, np.arange(n)], parts.dim)


def _union(store: FeatureStore | None, key: str, digests: list[str], missing: list[int], share: list[int],
           readable: torch.Tensor, in_memory: list, dim: int) -> tuple[list[Rows], torch.Tensor]:
    """Under torchrun, once every process has computed (and written) its share of `missing`: every
    row for every process, from the store's union, or gathered where some process could not write."""
    readable = _all_max(readable.to(torch.uint8)).bool()  # also waits for every process's writes
    if store is not None and not _all_max(torch.tensor([len(in_memory)])).item():
        return [store.lookup(key, digests)[0]], readable  # all rows: this process may have found fewer
    # Some process holds rows in memory: gather them all (as float16, in the order of `my_share`).
    n = len(digests)
    mine = [Rows.absent(n, dim), *_memory(in_memory, n)]
    if store is not None:
        mine.append(store.lookup(key, [digests[i] for i in share])[0].placed(share, n))
    local = torch.from_numpy(_first_of_each(Rows.cat(mine), n).take(np.asarray(share, dtype=np.int64)))
    gathered = distributed.gather_shares(local, len(missing))  # (len(missing), D) in `missing` order
    return [Rows.of(gathered).placed(missing, n)], readable


def _all_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over all processes (also a point every process must reach)."""
    import torch.distributed as dist

    shared = t.to(_comm_device())
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return shared.cpu()


def cached_features(backbone: Backbone, paths: list[Path], view: View, store: FeatureStore | None, *,
                    device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                    stats: CacheStats | None = None, engine: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float16 features of `paths` under `view` in memory, and a readable-image mask (see
    `cached_rows`, which leaves stored rows memory-mapped)."""
    rows, ok = cached_rows(backbone, paths, view, store, device=device, num_workers=num_workers,
                           progress=progress, stats=stats, engine=engine)
    return rows.tensor(), ok


# ---------------------------------------------------------------- what training consumes

class FeatureSet(Dataset):
    """(features, label) rows: float16 `Rows` (memory-mapped shards or memory), handed out as float32 batches."""

    def __init__(self, features: Rows | torch.Tensor, labels: torch.Tensor, *, centre: int | None = None):
        self.rows = features if isinstance(features, Rows) else Rows.of(features)  # N rows of D
        self.labels = labels  # (N,) int64
        self.centre = len(labels) if centre is None else centre  # the first rows, one per photo: centre crops

    @property
    def dim(self) -> int:
        return self.rows.dim

    @property
    def features(self) -> torch.Tensor:
        """All rows in memory, (N, D) float16: for inspection; training reads batches (`__getitems__`)."""
        return self.rows.tensor()

    def centre_crops(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n, D) float32, labels (n,)): one row per photo, its centre crop, without the
        augmented copies (calibration cross-fits by photo: a copy must not stand in for its original)."""
        return self.rows.take(np.arange(self.centre)).astype(np.float32), self.labels[:self.centre].numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.rows.take([i])[0]).float(), self.labels[i]

    def __getitems__(self, indices: list[int]):
        # The DataLoader asks for a whole batch at once: one read per shard instead of N small ones.
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.rows.take(idx)).float(), self.labels[torch.from_numpy(idx)]


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
    stats: CacheStats  # stats.engine: what computed the features


def load_feature_data(data_dir: str | Path, backbone: Backbone, *, augmented_views: int = 0,
                      cache_dir: str | Path | None = None, use_disk: bool = True,
                      device: torch.device | str = "cpu", num_workers: int = 0,
                      log: Callable[[str], None] = print, progress: bool = True, engine: str = "auto") -> FeatureData:
    """Features of the train split (centre crop + `augmented_views` augmented copies per image) and of
    the valid split (centre crop), computed once (by `engine`: "torch", "onnx", or "auto": see
    `resolve_engine`) and cached on disk under `cache_dir`."""
    engine = resolve_engine(engine, device)
    train_set = FlowerFolder(split_dir(data_dir, "train"))  # used only for its file list and labels
    valid_set = FlowerFolder(split_dir(data_dir, "valid"), classes=train_set.classes)
    store = FeatureStore(cache_dir, backbone) if use_disk else None
    stats = CacheStats()
    train_paths, train_labels = [p for p, _ in train_set.samples], torch.tensor([y for _, y in train_set.samples])
    valid_paths, valid_labels = [p for p, _ in valid_set.samples], torch.tensor([y for _, y in valid_set.samples])
    common = dict(device=device, num_workers=num_workers, progress=progress, stats=stats, engine=engine)
    train_digests, valid_digests = [file_digest(p) for p in train_paths], [file_digest(p) for p in valid_paths]
    views = [augmented_view(backbone, i) for i in range(1, augmented_views + 1)]
    if store is not None:
        precision = precision_on(torch.device(device), engine)
        check_room(store, backbone, [(centre_view(backbone).key(precision), train_digests + valid_digests),
                                     *((view.key(precision), train_digests) for view in views)], log=log)
    # One call for both splits' centre crops: one pass of the loader, one store to update.
    centre, ok = cached_rows(backbone, train_paths + valid_paths, centre_view(backbone), store, **common,
                             digests=train_digests + valid_digests)
    n = len(train_paths)
    train_ok, valid_ok = ok[:n].numpy(), ok[n:].numpy()
    xs, ys = [centre.select(np.flatnonzero(train_ok))], [train_labels[ok[:n]]]
    for view in views:
        aug, aug_ok = cached_rows(backbone, train_paths, view, store, **common, digests=train_digests)
        xs.append(aug.select(np.flatnonzero(aug_ok.numpy())))
        ys.append(train_labels[aug_ok])
    train = FeatureSet(Rows.cat(xs), torch.cat(ys), centre=len(ys[0]))
    valid = FeatureSet(centre.select(n + np.flatnonzero(valid_ok)), valid_labels[ok[n:]])
    # The head must not train on a category none of whose photos could be read.
    refuse_unreadable_categories(train_set.root, train_set.classes, set(train_labels[ok[:n]].tolist()))
    if len(train) == 0 or len(valid) == 0:
        raise UserError(f"no {'training' if len(train) == 0 else 'validation'} image of {data_dir} could be read")
    unreadable = int((~ok).sum())
    if unreadable:
        log(f"skipped {unreadable} unreadable images (each named in a warning above)")
    where = f" (cache: {store.dir})" if store else ""
    rate = f", {stats.computed / stats.seconds:.1f} images/s on {stats.engine}" if stats.seconds else ""
    what = f"Activations below the top {backbone.split} blocks" if backbone.split else "Features"
    log(f"{what}: {stats.computed} computed in {stats.seconds:.1f} s{rate}, {stats.cached} from the "
        f"cache{where}; {len(train)} training rows (centre crop + {augmented_views} augmented views per image), "
        f"{len(valid)} validation rows")
    return FeatureData(train, valid, train_set.classes, stats)


def cached_training_data(config: TrainConfig, data_dir: str | Path, backbone: Backbone, *,
                         device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                         progress: bool = True, cache_dir: str | Path | None = None):
    """What `training.run_training` needs on the cached path: (train_loader, valid_loader, classes,
    the engine that computed the features)."""
    views = config.augmented_views if config.augment else 0  # --no_augment: centre crops only
    if config.augmented_views and not config.augment:
        log(f"--no_augment: ignoring --augmented_views {config.augmented_views}")
    data = load_feature_data(data_dir, backbone, augmented_views=views, cache_dir=cache_dir, device=device,
                             num_workers=config.num_workers, log=log, progress=progress, engine=config.engine)
    train_loader = feature_loader(data.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    valid_loader = feature_loader(data.valid, batch_size=max(config.batch_size, 256), shuffle=False)
    return train_loader, valid_loader, data.classes, data.stats.engine
