"""An append-only store of float rows keyed by image digest: memory-mapped shards, checked on read.

One folder per store. A shard is two files: NAME.npy, an (n, D) array in numpy's format (read
memory-mapped, so a store larger than RAM costs only the pages actually read), and NAME.json, its
manifest: the n image digests in row order and a checksum over the array file and those digests.
The manifest is written after the array, atomically: a shard exists once its manifest does.

- **Append-only.** A shard is never rewritten. Every writer names its own shards (process id, a
  random token, a sequence number), so concurrent writers (two runs, torchrun's processes) never
  lose rows; readers take the union. The index (digest -> shard, row) is built from the manifests.
- **Compaction.** Many small shards (one per piece of a feature pass) are merged into bigger ones:
  the merged shard is committed before the small ones are removed, so no row is ever missing (at
  worst a reader that loses the race recomputes a row, and duplicates are harmless).
- **Trusted only when intact.** Before any row of a shard is used, the shard is verified: manifest
  well formed, checksum, dtype, width, rows = digests, all values finite. A shard that fails is a
  cache miss: one warning line naming it, removed, its rows recomputed by the caller.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .files import atomic_write

# The precision rows are kept in: the feature cache's, and a checkpoint's calibration arrays (half
# the size of float32; bench/bench_training.py shows no accuracy cost). Torch-free, for ONNX prediction.
STORE_DTYPE = np.float16
TARGET_BYTES = 64 << 20  # a compacted shard's size: small enough that a damaged one costs little to recompute
COMPACT_AT = 8  # this many small shards (under half the target) trigger a merge
STALE_SECONDS = 3600  # a shard file without its manifest this old was left by a killed writer
_CHUNK = 1 << 20


class Damaged(Exception):
    """A shard that must not be read; the message says why."""


def checksum(array_file: Path, digests: list[str]) -> str:
    """Over the array file's bytes (header included) and the digests, so that an edited manifest fails too."""
    h = hashlib.sha256()  # the fastest of hashlib's here (CPUs' SHA instructions): verifying is a full read
    with open(array_file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    h.update("\n".join(digests).encode())
    return h.hexdigest()[:32]


def all_finite(block: np.ndarray) -> bool:
    if block.dtype == np.float16:  # 4x faster than np.isfinite on float16: inf and NaN have every exponent bit set
        return not ((block.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(block).all())


class ShardStore:
    """The shards in `directory`, each (n, `dim`) of `dtype`."""

    def __init__(self, directory: str | Path, dim: int, dtype, *, format_version: int = 1,
                 warn: Callable[[str], None] = print):
        self.dir, self.dim, self.dtype = Path(directory), dim, np.dtype(dtype)
        self.format, self.warn = format_version, warn
        self.writer = f"{os.getpid()}-{secrets.token_hex(4)}"  # unique among concurrent writers
        self._written = 0
        self._manifests: dict[str, list[str]] = {}  # shard name -> digests, for shards not known damaged
        self._arrays: dict[str, np.ndarray] = {}  # verified shards, memory-mapped
        self._damaged: set[str] = set()
        self._index: dict[str, tuple[str, int]] = {}  # digest -> (shard, row), over the shards in _index_of
        self._index_of: set[str] = set()

    # ------------------------------------------------------------ reading

    def _scan(self) -> None:
        """Read the manifests not seen yet (shards never change, so each is read once) and forget
        the shards that are gone (merged by a compaction)."""
        try:
            names = sorted(p.name[:-5] for p in self.dir.glob("*.json"))
        except OSError:
            names = []
        for gone in set(self._manifests) - set(names):
            self._manifests.pop(gone)
            self._arrays.pop(gone, None)
        for name in names:
            if name in self._manifests or name in self._damaged:
                continue
            try:
                self._manifests[name] = self._read_manifest(name)["digests"]
            except FileNotFoundError:
                continue  # removed by a compaction since the listing
            except (Damaged, OSError, ValueError) as e:
                self._reject(name, str(e) if isinstance(e, Damaged) else f"unreadable manifest ({e})")

    def _read_manifest(self, name: str) -> dict:
        manifest = json.loads((self.dir / f"{name}.json").read_text())
        if not (isinstance(manifest, dict) and manifest.get("format") == self.format
                and isinstance(manifest.get("digests"), list) and isinstance(manifest.get("checksum"), str)
                and all(isinstance(d, str) for d in manifest["digests"])):
            raise Damaged("manifest is not this store's (format, digests, checksum)")
        return manifest

    def _open(self, name: str) -> np.ndarray | None:
        """The shard memory-mapped once verified; None (after one warning) if it fails."""
        if name in self._arrays:
            return self._arrays[name]
        try:
            manifest = self._read_manifest(name)
            digests = manifest["digests"]
            array = np.load(self.dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if array.dtype != self.dtype:
                raise Damaged(f"dtype {array.dtype}, expected {self.dtype}")
            if array.ndim != 2 or array.shape[1] != self.dim:
                raise Damaged(f"shape {array.shape}, expected rows of {self.dim} numbers")
            if array.shape[0] != len(digests):
                raise Damaged(f"{array.shape[0]} rows for {len(digests)} digests")
            if not array.flags.c_contiguous:
                raise Damaged("not in row order")
            if checksum(self.dir / f"{name}.npy", digests) != manifest["checksum"]:
                raise Damaged("checksum mismatch")
            step = max(1, _CHUNK // max(1, array.strides[0]))
            if not all(all_finite(array[i:i + step]) for i in range(0, len(array), step)):
                raise Damaged("holds non-finite values")
        except FileNotFoundError:
            if (self.dir / f"{name}.json").exists():
                self._reject(name, "its array file is missing")
            else:  # both gone: merged away by a compaction since the listing; its rows are elsewhere
                self._manifests.pop(name, None)
            return None
        except (Damaged, OSError, ValueError, EOFError) as e:
            self._reject(name, str(e) if isinstance(e, Damaged) else f"unreadable ({type(e).__name__}: {e})")
            return None
        self._manifests[name] = digests
        self._arrays[name] = array
        return array

    def _reject(self, name: str, why: str) -> None:
        self._damaged.add(name)
        self._manifests.pop(name, None)
        self.warn(f"warning: feature cache {self.dir / name}.npy is damaged ({why}); recomputing its rows")
        for path in (self.dir / f"{name}.json", self.dir / f"{name}.npy"):  # a cache: removing it loses nothing
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)

    def lookup(self, digests: list[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(arrays, shard (N,) int, row (N,) int): digest i is arrays[shard[i]][row[i]]; shard -1 where absent.
        Only verified shards are returned; a damaged one is dropped and the lookup redone without it."""
        while True:
            self._scan()
            if self._index_of != set(self._manifests):  # rebuilt only when shards came or went
                self._index = {}
                for name, known in self._manifests.items():
                    for row, d in enumerate(known):
                        self._index.setdefault(d, (name, row))
                self._index_of = set(self._manifests)
            index = self._index
            needed = sorted({index[d][0] for d in digests if d in index})
            if all(self._open(name) is not None for name in needed):
                break
        names = {name: i for i, name in enumerate(needed)}
        shard = np.full(len(digests), -1, dtype=np.int64)
        row = np.zeros(len(digests), dtype=np.int64)
        for i, d in enumerate(digests):
            if d in index:
                shard[i], row[i] = names[index[d][0]], index[d][1]
        return [self._arrays[name] for name in needed], shard, row

    def __len__(self) -> int:
        """Rows stored (duplicates included), from the manifests."""
        self._scan()
        return sum(len(d) for d in self._manifests.values())

    # ------------------------------------------------------------ writing

    def append(self, digests: list[str], rows: np.ndarray) -> None:
        """Write `rows` (n, dim) as a new shard; raises OSError (a full disk) with nothing half-visible."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape != (len(digests), self.dim):
            raise ValueError(f"rows of shape {rows.shape} for {len(digests)} digests of width {self.dim}")
        if not all_finite(rows):
            raise ValueError("non-finite rows are not stored (they would read as damage)")
        self._written += 1
        self._commit(f"{self.writer}-{self._written:06d}", digests, lambda f: np.save(f, rows, allow_pickle=False))

    def _commit(self, name: str, digests: list[str], write_array: Callable) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        array_file = self.dir / f"{name}.npy"
        try:
            atomic_write(array_file, write_array)
            manifest = {"format": self.format, "digests": digests, "checksum": checksum(array_file, digests)}
            atomic_write(self.dir / f"{name}.json", lambda f: f.write(json.dumps(manifest).encode()))
        except BaseException:
            array_file.unlink(missing_ok=True)
            raise
        self._manifests[name] = list(digests)
        # Written from verified rows and checksummed as read back: this process need not verify it again.
        self._arrays[name] = np.load(array_file, mmap_mode="r", allow_pickle=False)

    def compact(self) -> int:
        """Merge small shards into ones of about TARGET_BYTES when there are COMPACT_AT or more of them;
        returns the number of shards merged. Skipped while another process compacts this store."""
        row_bytes = self.dim * self.dtype.itemsize
        if not self.dir.is_dir():
            return 0
        with _exclusive(self.dir / "compaction.lock") as mine:
            if not mine:
                return 0
            self._remove_stale_files()
            self._scan()  # other writers may have committed or merged since
            small = [n for n, d in self._manifests.items() if len(d) * row_bytes < TARGET_BYTES // 2]
            if len(small) < COMPACT_AT:
                return 0
            merged, group, size = 0, [], 0
            for name in small + [None]:
                if name is not None and self._open(name) is None:
                    continue
                rows = len(self._manifests[name]) if name is not None else 0
                if group and (name is None or (size + rows) * row_bytes > TARGET_BYTES):
                    merged += self._merge(group) if len(group) > 1 else 0
                    group, size = [], 0
                if name is not None:
                    group.append(name)
                    size += rows
            return merged

    def _merge(self, names: list[str]) -> int:
        seen, parts = set(), []  # (shard, rows to keep): duplicates across shards are dropped here
        for name in names:
            keep = [i for i, d in enumerate(self._manifests[name]) if not (d in seen or seen.add(d))]
            parts.append((name, keep))
        digests = [self._manifests[name][i] for name, keep in parts for i in keep]

        def write(f):
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                    "shape": (len(digests), self.dim)})
            for name, keep in parts:  # a block at a time: bounded memory whatever the shard sizes
                for start in range(0, len(keep), 4096):
                    f.write(np.ascontiguousarray(self._arrays[name][keep[start:start + 4096]]).tobytes())

        self._written += 1
        self._commit(f"{self.writer}-{self._written:06d}", digests, write)
        for name in names:  # manifest first: the shard is gone for readers before its array goes
            for suffix in (".json", ".npy"):
                (self.dir / f"{name}{suffix}").unlink(missing_ok=True)
            self._manifests.pop(name, None)
            self._arrays.pop(name, None)
        return len(names)

    def _remove_stale_files(self) -> None:
        """Array files without a manifest, and temporary files, left by writers killed long ago."""
        old = time.time() - STALE_SECONDS
        for path in list(self.dir.glob("*.npy")) + list(self.dir.glob(".*.tmp")):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.with_suffix(".json").exists() and path.stat().st_mtime < old:
                    path.unlink()


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Yields True when this process holds the lock (False if another does); no lock where flock is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: compaction stays safe without it, it may only run twice
        yield True
        return
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
