"""The feature store: what a frozen backbone gave for each photo, kept on disk between runs.

One folder per backbone (its name, weights and preprocessing: `backbone_key`) and one append-only
store per view (centre crop, or augmented view i), keyed by each image file's content hash (see
`shards`: memory-mapped shards, a checksum per shard, verified before use; a damaged one is a cache
miss). A second run, a resumed run or a hyperparameter search reuses them; a changed photo,
backbone or preprocessing misses the cache and is recomputed. They are float16 (half the size;
VGG's are 25,088 numbers per image), and batches are float32.

This module only keeps and finds rows (`Rows`, `FeatureStore`) and checks the disk has room
(`check_room`); `frozen_pass` computes them, `features` joins the two for training.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed, shards
from .backbones import Backbone, get_spec
from .errors import UserError
from .shards import ShardStore

CACHE_ENV = "FLOWER_CLASSIFIER_CACHE"  # overrides the default cache folder (tests point it at a temp dir)
CACHE_FORMAT = 2  # 2: checksummed memory-mapped shards. Bump when the stored layout changes: old entries miss
SAY_SIZE_BYTES = 100 << 20  # a frozen backbone's cache pass says its size from this much on (VGG: 2,000 views)


def stored(features: torch.Tensor) -> torch.Tensor:
    """`features` rounded to the precision the store keeps them in (`shards.STORE_DTYPE`)."""
    return features.to(torch.from_numpy(np.empty(0, shards.STORE_DTYPE)).dtype)


def default_cache_dir() -> Path:
    """$FLOWER_CLASSIFIER_CACHE, else $XDG_CACHE_HOME/flower_classifier/features (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flower_classifier" / "features"


def file_digest(path: str | Path) -> str:
    """Hash of the file's bytes: a photo edited in place gets new features, a renamed one keeps them."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def backbone_key(backbone: Backbone) -> str:
    """Names the backbone's exact function: name, split, preprocessing and every weight's bytes. A
    `backbones.frozen_part` below the top n blocks is keyed `<name>-below<n>-<hash>`; the whole
    backbone (n = 0) keeps the key it always had."""
    h = hashlib.blake2b(digest_size=8)
    split = {"below": backbone.split} if backbone.split else {}
    h.update(json.dumps({"format": CACHE_FORMAT, "name": backbone.name, **split,
                         "preprocessing": backbone.preprocessing.to_dict()}, sort_keys=True).encode())
    for name, tensor in backbone.module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    below = f"-below{backbone.split}" if backbone.split else ""
    return f"{backbone.name}{below}-{h.hexdigest()}"


def warn(message: str) -> None:
    if distributed.is_main():  # every process sees the same store; one says so
        print(message, file=sys.stderr)


# ---------------------------------------------------------------- rows in memory or memory-mapped

class Rows:
    """N feature rows, each row `row[i]` of `arrays[source[i]]` (source -1: none, read as zeros). The
    arrays are memory-mapped shards or in-memory blocks: nothing is copied until rows are taken."""

    def __init__(self, arrays: list[np.ndarray], source: np.ndarray, row: np.ndarray, dim: int):
        self.arrays, self.source, self.row, self.dim = arrays, source, row, dim

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> "Rows":
        array = features.numpy() if isinstance(features, torch.Tensor) else features
        return cls([array], np.zeros(len(array), dtype=np.int64), np.arange(len(array)), array.shape[1])

    @classmethod
    def absent(cls, n: int, dim: int) -> "Rows":
        return cls([], np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64), dim)

    @classmethod
    def cat(cls, parts: list["Rows"]) -> "Rows":
        arrays, sources, offset = [], [], 0
        for p in parts:
            arrays += p.arrays
            sources.append(np.where(p.source < 0, -1, p.source + offset))
            offset += len(p.arrays)
        return cls(arrays, np.concatenate(sources), np.concatenate([p.row for p in parts]), parts[0].dim)

    def __len__(self) -> int:
        return len(self.source)

    def select(self, index) -> "Rows":
        return Rows(self.arrays, self.source[index], self.row[index], self.dim)

    def placed(self, positions: list[int], n: int) -> "Rows":
        """These rows as the rows at `positions` of an n-long list (absent elsewhere)."""
        source, row = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
        source[positions], row[positions] = self.source, self.row
        return Rows(self.arrays, source, row, self.dim)

    def take(self, index) -> np.ndarray:
        """(B, D) rows at `index`, read shard by shard (from a memory map, only the pages they touch)."""
        source, row = self.source[index], self.row[index]
        out = np.zeros((len(source), self.dim), dtype=self.arrays[0].dtype if self.arrays else shards.STORE_DTYPE)
        for s in np.unique(source[source >= 0]):
            mine = source == s
            out[mine] = self.arrays[s][row[mine]]
        return out

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.take(np.arange(len(self))))


# ---------------------------------------------------------------- the disk cache

class FeatureStore:
    """CACHE_DIR/<backbone key>/<view key>/: one append-only store of memory-mapped shards per view
    (see `shards`). A write that fails (a full disk) warns once; the run then keeps its features in
    memory."""

    def __init__(self, cache_dir: str | Path | None, backbone: Backbone):
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dir = root.expanduser() / backbone_key(backbone)
        self.dim, self.writable, self._views = backbone.feature_dim, True, {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--cache_dir {root}: cannot store features there ({e.strerror or e}); "
                            f"pass a writable folder") from None

    def view(self, view_key: str) -> ShardStore:
        if view_key not in self._views:
            self._views[view_key] = ShardStore(self.dir / view_key, self.dim, shards.STORE_DTYPE,
                                               format_version=CACHE_FORMAT, warn=warn)
        return self._views[view_key]

    def lookup(self, view_key: str, digests: list[str]) -> tuple[Rows, torch.Tensor]:
        """The stored rows of `digests` (memory-mapped) and an (N,) mask of those found."""
        arrays, source, row = self.view(view_key).lookup(digests)
        return Rows(arrays, source, row, self.dim), torch.from_numpy(source >= 0)

    def add(self, view_key: str, digests: list[str], features: np.ndarray) -> bool:
        """Store new rows as a new shard; False (after one warning for the whole run) if it cannot."""
        if not self.writable:
            return False
        try:
            self.view(view_key).append(digests, features)
            return True
        except OSError as e:
            self.writable = False
            warn(f"warning: cannot write the feature cache in {self.dir} ({e.strerror or e}); "
                 f"keeping this run's features in memory")
            return False

    def compact(self, view_key: str) -> None:
        if self.writable:
            with contextlib.suppress(OSError):  # compaction is only tidying: failing to do it loses nothing
                self.view(view_key).compact()


@dataclass
class CacheStats:
    cached: int = 0
    computed: int = 0  # readable images run through the backbone
    seconds: float = 0.0  # spent computing (unreadable images included)
    engine: str = ""  # what computed (or had computed) the features: "onnx" or "torch"


def _megabytes(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def check_room(store: FeatureStore, backbone: Backbone, passes: list[tuple[str, list[str]]], *,
               log: Callable[[str], None]) -> None:
    """Before a cache pass over `passes` ((view key, image digests) pairs): what it will add to the
    store, said in one line (always for activations below a split, from SAY_SIZE_BYTES on for
    features), and refused in one line when the cache folder's disk cannot hold it (activations can
    be 100,352 numbers per view: a pass must not fill the disk and then fall back to memory)."""
    rows = sum(len(digests) for _, digests in passes)
    missing = sum(int((~store.lookup(key, digests)[1]).sum()) for key, digests in passes)
    if not missing:
        return
    needed = missing * backbone.feature_dim * np.dtype(shards.STORE_DTYPE).itemsize
    if backbone.split:
        shape = "x".join(map(str, get_spec(backbone.name).split_shapes[backbone.split]))
        what = f"{backbone.name} activations below the top {backbone.split} blocks: {shape} = "
    else:
        what = f"{backbone.name} features: "
    what += f"{backbone.feature_dim:,} numbers per view, {rows:,} views"
    what += f" ({missing:,} to compute)" if missing < rows else ""
    if backbone.split or needed >= SAY_SIZE_BYTES:
        log(f"caching {what}, {_megabytes(needed)} in {store.dir}")
    free = shutil.disk_usage(store.dir).free
    if needed > free:
        smaller = ", a smaller --finetune" if backbone.split else ""
        raise UserError(f"cache folder {store.dir.parent}: caching {what} takes {_megabytes(needed)} and its disk has "
                        f"{_megabytes(free)} free; pass --cache_dir on a disk with room, or cache less (fewer "
                        f"--augmented_views{smaller})")
