"""Backbone features computed once: the frozen backbone never changes, so training the head on its
stored outputs gives the same model as running it every epoch, at a fraction of the cost.

Features are stored on disk between runs, in one folder per backbone (its name, weights and
preprocessing) and one append-only store per view (centre crop, or augmented view i), keyed by
each image file's content hash (see `shards`: memory-mapped shards, a checksum per shard, verified
before use; a damaged one is a cache miss). A second run, a resumed run or a hyperparameter search
reuses them; a changed photo, backbone or preprocessing misses the cache and is recomputed. They
are float16 (half the size; VGG's are 25,088 numbers per image), and batches are float32.

Past RAM: the feature pass holds one piece (a few batches) in memory and writes it as a new shard,
so a killed pass keeps what it computed. Training reads a `FeatureSet` over the memory-mapped
shards: each batch reads only its own rows from disk (through the page cache), so a data set whose
features exceed RAM still trains. Without a disk store (or on a full disk) they stay in memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .progress import progress_bar
from . import devices, distributed
from .backbones import Backbone, get_spec
from .config import TrainConfig
from .data import (EpochSampler, FlowerFolder, PhotoList, eval_transform, refuse_unreadable_categories,
                   skip_none_collate, split_dir, train_transform)
from .errors import UserError
from .files import atomic_write
from .shards import ShardStore

CACHE_ENV = "FLOWER_CLASSIFIER_CACHE"  # overrides the default cache folder (tests point it at a temp dir)
CACHE_FORMAT = 2  # 2: checksummed memory-mapped shards. Bump when the stored layout changes: old entries miss
STORE_DTYPE = torch.float16  # on disk and in memory; the benchmark shows no accuracy cost
ENGINES = ("torch", "onnx")  # what runs the frozen pass: PyTorch (CPU or CUDA), or ONNX Runtime (CPU)
EXTRACT_BATCH = 32  # images per forward pass of the feature pass on the CPU (4x this on CUDA)
CORES_PER_DECODER = 4  # JPEG decoding + resize costs about a quarter of EfficientNet-Lite0's pass per image


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


# ---------------------------------------------------------------- views: which transform, which randomness

@dataclass(frozen=True)
class View:
    """One way of turning every image into a tensor: the centre crop, or augmented copy number `index`."""

    name: str
    transform: Callable
    index: int = 0  # 0: deterministic centre crop; i > 0: random augmentation seeded by (i, image)
    min_size: int | None = None  # JPEGs decoded at reduced size, never below this (the resize target)

    def seed(self, digest: str) -> int | None:
        # Seeded by the image's content, not the run's seed: view i is the same picture in every run,
        # so it is computed once and shared by all runs and searches.
        return None if self.index == 0 else int(_short_hash(f"{self.index}:{digest}"), 16)

    def key(self, precision: str) -> str:
        return f"{self.name}-{precision}-{_short_hash(f'{self.transform!r} draft {self.min_size}')}"


def centre_view(backbone: Backbone) -> View:
    # Resized to resize_size anyway: a large JPEG decodes at 1/2..1/8 scale, never below that size.
    p = backbone.preprocessing
    return View("centre", eval_transform(p), min_size=p.resize_size)


def augmented_view(backbone: Backbone, index: int) -> View:
    return View(f"aug{index}", train_transform(backbone.preprocessing), index)


# ---------------------------------------------------------------- extraction

def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def resolve_engine(engine: str, device: torch.device | str) -> str:
    """"auto" as the engine it means on `device`: ONNX Runtime on the CPU (several times PyTorch
    eager's speed there), PyTorch on CUDA/MPS (channels_last, bf16 autocast); others checked."""
    device = torch.device(device)
    if engine == "auto":
        return "onnx" if device.type == "cpu" and _has_onnxruntime() else "torch"
    precision_on(device, engine)  # refuses an unknown engine, or ONNX on a GPU
    return engine


def precision_on(device: torch.device, engine: str = "torch") -> str:
    """What the forward pass computes in: bf16 (or fp16) autocast on CUDA, float32 elsewhere; part of
    the cache key, so are ONNX Runtime's features (its float32 rounding differs from torch's)."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "onnx" and device.type != "cpu":
        raise UserError("--engine onnx runs the feature pass on the CPU; drop --gpu, or use --engine torch")
    if engine == "onnx":
        return "onnx-fp32"
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def share_cores(num_workers: int, device: torch.device) -> tuple[int, int | None]:
    """(decode worker processes, engine threads) for a feature pass on `device` given at most
    `num_workers` workers. On the CPU the two share the cores instead of fighting over them: one
    decoder per CORES_PER_DECODER cores keeps up with the engine, which takes the other cores (or
    the user's --threads). On 2 cores: 1 decoder and 1 engine thread, measured fastest
    (bench/bench_training.py). On a GPU, None: torch's threads are left alone."""
    if device.type != "cpu":
        return num_workers, None
    cores = devices.cpu_cores()
    workers = min(num_workers, max(1, cores // CORES_PER_DECODER))
    return workers, devices.chosen_threads() or max(1, cores - workers)


_onnx_sessions: dict[tuple[str, int], Callable] = {}  # (backbone key, threads) -> ONNX Runtime's forward pass
_not_exportable: set[str] = set()  # backbone keys whose export failed (said once a process)
ONNX_TOLERANCE = 1e-4  # a fresh export must give PyTorch's features to this, relative to the largest (random images)


def _export(backbone: Backbone) -> bytes:
    """The frozen backbone as an ONNX model: fp32, any batch size."""
    import io
    import warnings

    from .export import OPSET

    size = backbone.preprocessing.input_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
        torch.onnx.export(backbone.module.eval(), (torch.zeros(1, 3, size, size),), buffer, dynamo=False,
                          input_names=["image"], output_names=["features"], opset_version=OPSET,
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
    return buffer.getvalue()


def _model_digest(model: bytes) -> str:
    return hashlib.blake2b(model, digest_size=8).hexdigest()


def _stored_model(folder: Path | None) -> bytes | None:
    """An export kept in the backbone's cache folder (named by the digest of its bytes), if intact."""
    for path in sorted(folder.glob("backbone-*.onnx")) if folder is not None else []:
        with contextlib.suppress(OSError):
            model = path.read_bytes()
            if path.stem == f"backbone-{_model_digest(model)}":
                return model
            path.unlink()  # damaged: exported again
    return None


def _check_export(backbone: Backbone, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    size = backbone.preprocessing.input_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone.module.eval()(images)
    error = (run(images) - expected).abs().max().item()
    if not error <= ONNX_TOLERANCE * max(1.0, expected.abs().max().item()):
        raise ValueError(f"its features differ from PyTorch's by up to {error:.2g}")


def _onnx_forward(backbone: Backbone, threads: int, folder: Path | None) -> Callable | None:
    """The frozen backbone run by ONNX Runtime on the CPU with `threads` threads, or None when it
    cannot be exported (said in one line; the caller runs PyTorch instead). Exported once and kept
    in `folder` (the backbone's cache folder, keyed like its features), checked against PyTorch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--engine onnx needs the onnxruntime package: `pip install onnxruntime`, "
                        "or use --engine torch") from None
    key = backbone_key(backbone)
    if key in _not_exportable:
        return None
    if (key, threads) not in _onnx_sessions:
        try:
            model = _stored_model(folder)
            fresh = model is None
            model = _export(backbone) if fresh else model
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            # Idle threads sleep rather than spin: the decoders need those cores (as in `runtime`).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            run = lambda images: torch.from_numpy(session.run(None, {"image": images.numpy()})[0])  # noqa: E731
            if fresh:
                _check_export(backbone, run)
                if folder is not None:
                    with contextlib.suppress(OSError):  # not kept: exported again next time
                        atomic_write(folder / f"backbone-{_model_digest(model)}.onnx", lambda f: f.write(model))
        except Exception as e:  # the exporter and ONNX Runtime raise many kinds on an unsupported layer
            _not_exportable.add(key)
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            _warn(f"warning: {backbone.title} could not be exported to ONNX ({type(e).__name__}: {reason}); "
                  f"its {'activations' if backbone.split else 'features'} are computed by PyTorch")
            return None
        _onnx_sessions[(key, threads)] = run
    return _onnx_sessions[(key, threads)]


def _extract(backbone: Backbone, paths: list[Path], view: View, *, device: torch.device, seeds: list[int | None],
             batch_size: int | None, num_workers: int, progress: bool, engine: str = "torch",
             cache_folder: Path | None = None):
    """Yields (positions (B,), features (B, D) float32 on the CPU) for the readable images of `paths`.

    Batched, without autograd, with worker processes decoding images while the engine runs (on the
    CPU, the two share the cores: `share_cores`); on CUDA also channels_last and autocast.
    `engine="onnx"`: ONNX Runtime on the CPU instead of PyTorch (the caller has checked that the
    backbone exports). The backbone goes back to the CPU afterwards (and the GPU's cache is freed):
    the head trains on the stored features, so the backbone's weights need not hold GPU memory.
    """
    cuda = device.type == "cuda"
    precision = precision_on(device, engine)  # also refuses an unknown engine, or ONNX on a GPU
    num_workers, threads = share_cores(num_workers, device)
    # Targets are positions in `paths`; each photo's seed fixes its augmented view.
    dataset = PhotoList([(p, k) for k, p in enumerate(paths)], view.transform, seeds, min_size=view.min_size)
    loader = DataLoader(dataset, batch_size=batch_size or EXTRACT_BATCH * (4 if cuda else 1), num_workers=num_workers,
                        collate_fn=skip_none_collate, pin_memory=cuda,
                        generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()
    bar = progress_bar(loader, desc=f"features ({view.name})", unit="batch",
                       enabled=progress and distributed.is_main())
    module = backbone.module.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format) \
        if engine == "torch" else _onnx_forward(backbone, threads, cache_folder)
    try:
        with torch.inference_mode(), devices.threads(threads if engine == "torch" else None):
            for batch in bar:
                if batch is None:
                    continue
                images, where = batch  # (B, 3, S, S), (B,) positions in `paths`
                images = images.to(device, non_blocking=True)
                if cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with amp:
                    yield where, module(images).float().cpu()  # (B, D)
    finally:
        bar.close()
        if cuda:
            backbone.module.to("cpu", memory_format=torch.contiguous_format)
            torch.cuda.empty_cache()


def usable_engine(backbone: Backbone, engine: str, device: torch.device, num_workers: int,
                  cache_folder: Path | None = None) -> str:
    """`engine`, or "torch" when it is ONNX and the backbone cannot be exported (said in one line)."""
    if engine == "onnx" and _onnx_forward(backbone, share_cores(num_workers, device)[1] or 1, cache_folder) is None:
        return "torch"
    return engine


def _seeds(view: View, paths: list[Path], digests: list[str] | None) -> list[int | None]:
    if not view.index:
        return [None] * len(paths)
    return [view.seed(d) for d in (digests if digests is not None else [file_digest(p) for p in paths])]


def extract_features(backbone: Backbone, paths: list[Path], view: View, *, device: torch.device | str = "cpu",
                     digests: list[str] | None = None, batch_size: int | None = None, num_workers: int = 0,
                     progress: bool = True, engine: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 of `paths` under `view`, and which images could be read (N,) bool, in
    memory. Under torchrun each process takes every world_size-th image and all get all rows
    (rounded to float16 on the way, as the cache stores them)."""
    seeds = _seeds(view, paths, digests)
    share = distributed.my_share(len(paths))
    features = torch.zeros(len(share), backbone.feature_dim)
    ok = torch.zeros(len(share), dtype=torch.bool)
    device = torch.device(device)
    engine = resolve_engine(engine, device)  # an unknown engine, or ONNX on a GPU, refused before any export
    engine = usable_engine(backbone, engine, device, num_workers)
    for where, rows in _extract(backbone, [paths[i] for i in share], view, device=device,
                                seeds=[seeds[i] for i in share], batch_size=batch_size,
                                num_workers=num_workers, progress=progress, engine=engine):
        features[where], ok[where] = rows, True
    if distributed.world_size() == 1:
        return features, ok
    # Gathered as stored (float16: half the traffic) and as uint8 (gloo has no bool).
    features = distributed.gather_shares(features.to(STORE_DTYPE), len(paths)).float()
    return features, distributed.gather_shares(ok.to(torch.uint8), len(paths)).bool()


# ---------------------------------------------------------------- rows in memory or memory-mapped

def _numpy_dtype() -> np.dtype:
    return torch.empty(0, dtype=STORE_DTYPE).numpy().dtype


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

    def take(self, index) -> np.ndarray:
        """(B, D) rows at `index`, read shard by shard (from a memory map, only the pages they touch)."""
        source, row = self.source[index], self.row[index]
        out = np.zeros((len(source), self.dim), dtype=self.arrays[0].dtype if self.arrays else _numpy_dtype())
        for s in np.unique(source[source >= 0]):
            mine = source == s
            out[mine] = self.arrays[s][row[mine]]
        return out

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.take(np.arange(len(self))))


# ---------------------------------------------------------------- the disk cache

PIECE_BYTES = 32 << 20  # a feature pass writes a shard every this many bytes of rows...
PIECE_ROWS = 2048  # ...or rows, whichever comes first: a killed pass keeps all but the last piece


def _warn(message: str) -> None:
    if distributed.is_main():  # every process sees the same store; one says so
        print(message, file=sys.stderr)


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
            self._views[view_key] = ShardStore(self.dir / view_key, self.dim, _numpy_dtype(),
                                               format_version=CACHE_FORMAT, warn=_warn)
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
            _warn(f"warning: cannot write the feature cache in {self.dir} ({e.strerror or e}); "
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
            rows, found = _absent(len(paths), backbone.feature_dim), torch.zeros(len(paths), dtype=torch.bool)
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
    seeds = _seeds(view, [paths[i] for i in share], [digests[i] for i in share])
    in_memory = []  # (positions, float16 rows) that are not in the store
    readable = torch.zeros(len(paths), dtype=torch.bool)
    piece_rows = max(1, min(PIECE_ROWS, PIECE_BYTES // (backbone.feature_dim * 2)))
    piece: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush():
        where = torch.cat([w for w, _ in piece])
        block = torch.cat([f for _, f in piece]).to(STORE_DTYPE)  # rounded now: a cached rerun trains identically
        piece.clear()
        finite = torch.isfinite(block).all(dim=1)  # a non-finite row is never stored (it would read as damage)
        if store is not None and finite.any() and store.add(key, [digests[i] for i in where[finite].tolist()],
                                                            block[finite].numpy()):
            where, block = where[~finite], block[~finite]
        if len(where):
            in_memory.append((where, block))

    for where, batch in _extract(backbone, [paths[i] for i in share], view, device=device, seeds=seeds,
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
            new.append(_placed(store.lookup(key, [digests[i] for i in missing])[0], missing, len(paths)))
    rows = _first_of_each(Rows.cat([rows, *new]), len(paths))
    ok = found | readable
    if stats is not None:
        stats.seconds += time.perf_counter() - start
        stats.cached += int(found.sum())
        stats.computed += int(ok.sum()) - int(found.sum())  # unreadable images yield no features
    if distributed.world_size() > 1 and store is not None and distributed.is_main():
        store.compact(key)  # one process tidies, after all have read
    return rows, ok


def _absent(n: int, dim: int) -> Rows:
    return Rows([], np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64), dim)


def _placed(rows: Rows, positions: list[int], n: int) -> Rows:
    """`rows` of `positions` as rows of an n-long list (absent elsewhere)."""
    source, row = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    source[positions], row[positions] = rows.source, rows.row
    return Rows(rows.arrays, source, row, rows.dim)


def _memory(blocks: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[Rows]:
    return [_placed(Rows.of(block), where.tolist(), n) for where, block in blocks]


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
    mine = [_absent(n, dim), *_memory(in_memory, n)]
    if store is not None:
        mine.append(_placed(store.lookup(key, [digests[i] for i in share])[0], share, n))
    local = torch.from_numpy(_first_of_each(Rows.cat(mine), n).take(np.asarray(share, dtype=np.int64)))
    gathered = distributed.gather_shares(local, len(missing))  # (len(missing), D) in `missing` order
    return [_placed(Rows.of(gathered), missing, n)], readable


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


SAY_SIZE_BYTES = 100 << 20  # a frozen backbone's cache pass says its size from this much on (VGG: 2,000 views)


def _megabytes(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def check_room(store: FeatureStore, backbone: Backbone, passes: list[tuple[View, list[str]]], *,
               device: torch.device, engine: str, log: Callable[[str], None]) -> None:
    """Before a cache pass over `passes` ((view, image digests) pairs): what it will add to the store,
    said in one line (always for activations below a split, from SAY_SIZE_BYTES on for features), and
    refused in one line when the cache folder's disk cannot hold it (activations can be 100,352
    numbers per view: a pass must not fill the disk and then fall back to memory)."""
    rows = sum(len(digests) for _, digests in passes)
    missing = sum(int((~store.lookup(view.key(precision_on(device, engine)), digests)[1]).sum())
                  for view, digests in passes)
    if not missing:
        return
    needed = missing * backbone.feature_dim * _numpy_dtype().itemsize
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
        check_room(store, backbone, [(centre_view(backbone), train_digests + valid_digests),
                                     *((view, train_digests) for view in views)],
                   device=torch.device(device), engine=engine, log=log)
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
