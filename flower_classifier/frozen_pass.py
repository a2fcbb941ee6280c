"""The frozen pass: photos -> backbone features, by PyTorch (CPU or CUDA) or ONNX Runtime (CPU).

Batched and without autograd. Decoding overlaps the engine: the next batch is decoded while the
engine runs the current one, in a thread of this process on a small machine (no copies between
processes) or in worker processes on a large one, and the two share the cores this process may use
instead of fighting over them (`share_cores`). Large JPEGs decode at reduced size for the centre
crop, exactly as prediction decodes them (`images.decode_image`'s `min_size`).

The features are not stored here (`feature_store`), nor joined for training (`features`).
"""
from __future__ import annotations

import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from . import devices, distributed
from .backbones import Backbone
from .data import PhotoList, eval_transform, skip_none_collate, train_transform
from .errors import UserError
from .feature_store import backbone_key, file_digest, short_hash, stored, warn
from .files import atomic_write
from .progress import progress_bar

OPSET = 17  # the ONNX opset of every export: the frozen pass's backbone and `export`'s whole model
ENGINES = ("torch", "onnx")  # what runs the frozen pass: PyTorch (CPU or CUDA), or ONNX Runtime (CPU)
EXTRACT_BATCH = 32  # images per forward pass of the feature pass on the CPU (4x this on CUDA)
# A decode worker process per this many cores: JPEG decoding + resize costs about a quarter of
# EfficientNet-Lite0's pass per image. Below that (2 or 3 cores) one decoding thread beside the
# engine's threads keeps up without copying batches between processes.
CORES_PER_DECODER = 4
ONNX_TOLERANCE = 1e-4  # a fresh export must give PyTorch's features to this, relative to the largest (random images)


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
        return None if self.index == 0 else int(short_hash(f"{self.index}:{digest}"), 16)

    def key(self, precision: str) -> str:
        return f"{self.name}-{precision}-{short_hash(f'{self.transform!r} draft {self.min_size}')}"


def centre_view(backbone: Backbone) -> View:
    # Resized to resize_size anyway: a large JPEG decodes at 1/2..1/8 scale, never below that size,
    # as the predictor decodes it (one rule: `images.decode_image`).
    p = backbone.preprocessing
    return View("centre", eval_transform(p), min_size=p.resize_size)


def augmented_view(backbone: Backbone, index: int) -> View:
    return View(f"aug{index}", train_transform(backbone.preprocessing), index)


def view_seeds(view: View, paths: list[Path], digests: list[str] | None) -> list[int | None]:
    if not view.index:
        return [None] * len(paths)
    return [view.seed(d) for d in (digests if digests is not None else [file_digest(p) for p in paths])]


# ---------------------------------------------------------------- engines and cores

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
    `num_workers` workers. On the CPU the two share the cores this process may use (its affinity,
    not the machine's count) instead of fighting over them: one worker process per
    CORES_PER_DECODER cores, the engine on the others (or the user's --threads). With no worker
    process (2 or 3 cores, or --workers 0) one thread of this process decodes the next batch while
    the engine runs on all the cores: never both at full count. On a GPU, None: torch's threads are
    left alone."""
    if device.type != "cpu":
        return num_workers, None
    cores = devices.cpu_cores()
    workers = min(num_workers, cores // CORES_PER_DECODER)
    return workers, devices.chosen_threads() or max(1, cores - workers)


# ---------------------------------------------------------------- ONNX Runtime

_onnx_sessions: dict[tuple[str, int], Callable] = {}  # (backbone key, threads) -> ONNX Runtime's forward pass
_not_exportable: set[str] = set()  # backbone keys whose export failed (said once a process)


def _export(backbone: Backbone) -> bytes:
    """The frozen backbone as an ONNX model: fp32, any batch size."""
    import io
    import warnings

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
    """Refuse an export whose features on noise images differ from PyTorch's. The tests' seeded
    random backbones fail it, and then run on PyTorch, the safe side: with BatchNorm statistics
    measured on three photos, noise drives random RegNetY-16GF's features to ~1,400 (1.7 on the
    photos), where float32 rounding is amplified layer by layer: ONNX Runtime is 3.3-4.6 off (on the
    photos 6e-5), and PyTorch on 1 or 2 threads moves the median feature by 0.2%. (EfficientNet-B0
    and -V2-S fail the same way.) A pretrained backbone that failed it would be slower, not wrong."""
    size = backbone.preprocessing.input_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone.module.eval()(images)
    error = (run(images) - expected).abs().max().item()
    if not error <= ONNX_TOLERANCE * max(1.0, expected.abs().max().item()):
        raise ValueError(f"its features differ from PyTorch's by up to {error:.2g}")


def onnx_session(model: bytes, threads: int):
    """An ONNX Runtime CPU session on `threads` threads whose idle threads sleep rather than spin:
    the decoding thread needs those cores between the engine's bursts."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _onnx_forward(backbone: Backbone, threads: int, folder: Path | None) -> Callable | None:
    """The frozen backbone run by ONNX Runtime on the CPU with `threads` threads, or None when it
    cannot be exported (said in one line; the caller runs PyTorch instead). Exported once and kept
    in `folder` (the backbone's cache folder, keyed like its features), checked against PyTorch."""
    try:
        import onnxruntime  # noqa: F401
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
            session = onnx_session(model, threads)
            run = lambda images: torch.from_numpy(session.run(None, {"image": images.numpy()})[0])  # noqa: E731
            if fresh:
                _check_export(backbone, run)
                if folder is not None:
                    with contextlib.suppress(OSError):  # not kept: exported again next time
                        atomic_write(folder / f"backbone-{_model_digest(model)}.onnx", lambda f: f.write(model))
        except Exception as e:  # the exporter and ONNX Runtime raise many kinds on an unsupported layer
            _not_exportable.add(key)
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            warn(f"warning: {backbone.title} could not be exported to ONNX ({type(e).__name__}: {reason}); "
                 f"its {'activations' if backbone.split else 'features'} are computed by PyTorch")
            return None
        _onnx_sessions[(key, threads)] = run
    return _onnx_sessions[(key, threads)]


def usable_engine(backbone: Backbone, engine: str, device: torch.device, num_workers: int,
                  cache_folder: Path | None = None) -> str:
    """`engine`, or "torch" when it is ONNX and the backbone cannot be exported (said in one line)."""
    if engine == "onnx" and _onnx_forward(backbone, share_cores(num_workers, device)[1] or 1, cache_folder) is None:
        return "torch"
    return engine


# ---------------------------------------------------------------- the pass

def _decoded_ahead(dataset: PhotoList, batch_size: int) -> Iterator:
    """Collated batches of `dataset` in order, each decoded by one thread while the caller runs the
    engine on the one before (Pillow's decoder and resize and torch's ops release the GIL). One
    thread, in order: an augmented view's seeded random draws (`PhotoList`) never interleave."""
    starts = range(0, len(dataset), batch_size)
    load = lambda start: skip_none_collate(  # noqa: E731
        [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        ahead = pool.submit(load, starts[0]) if starts else None
        for start in starts[1:]:
            batch, ahead = ahead.result(), pool.submit(load, start)
            yield batch
        if ahead is not None:
            yield ahead.result()


class _Batches:
    """The batches of a feature pass, with a length for the progress bar."""

    def __init__(self, dataset: PhotoList, batch_size: int, workers: int, pin_memory: bool):
        self.dataset, self.batch_size, self.workers, self.pin = dataset, batch_size, workers, pin_memory

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        if not self.workers:
            return _decoded_ahead(self.dataset, self.batch_size)
        return iter(DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                               collate_fn=skip_none_collate, pin_memory=self.pin,
                               generator=torch.Generator().manual_seed(0)))  # leaves the global RNG alone


def frozen_pass(backbone: Backbone, paths: list[Path], view: View, *, device: torch.device, seeds: list[int | None],
                batch_size: int | None, num_workers: int, progress: bool, engine: str = "torch",
                cache_folder: Path | None = None):
    """Yields (positions (B,), features (B, D) float32 on the CPU) for the readable images of `paths`.

    Decoding overlaps the engine (`share_cores`: worker processes, or one thread of this process);
    on CUDA also channels_last and autocast. `engine="onnx"`: ONNX Runtime on the CPU instead of
    PyTorch (the caller has checked that the backbone exports); torch then keeps one thread, for the
    decoding thread's tensor ops, so that its idle threads do not spin against ONNX Runtime's. The
    backbone goes back to the CPU afterwards (and the GPU's cache is freed): the head trains on the
    stored features, so the backbone's weights need not hold GPU memory.
    """
    cuda = device.type == "cuda"
    precision = precision_on(device, engine)  # also refuses an unknown engine, or ONNX on a GPU
    num_workers, threads = share_cores(num_workers, device)
    # Targets are positions in `paths`; each photo's seed fixes its augmented view.
    dataset = PhotoList([(p, k) for k, p in enumerate(paths)], view.transform, seeds, min_size=view.min_size)
    batches = _Batches(dataset, batch_size or EXTRACT_BATCH * (4 if cuda else 1), num_workers, cuda)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()
    bar = progress_bar(batches, desc=f"features ({view.name})", unit="batch",
                       enabled=progress and distributed.is_main())
    module = backbone.module.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format) \
        if engine == "torch" else _onnx_forward(backbone, threads, cache_folder)
    torch_threads = threads if engine == "torch" else 1 if threads is not None else None
    try:
        with torch.inference_mode(), devices.threads(torch_threads):
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


def extract_features(backbone: Backbone, paths: list[Path], view: View, *, device: torch.device | str = "cpu",
                     digests: list[str] | None = None, batch_size: int | None = None, num_workers: int = 0,
                     progress: bool = True, engine: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 of `paths` under `view`, and which images could be read (N,) bool, in
    memory. Under torchrun each process takes every world_size-th image and all get all rows
    (rounded to float16 on the way, as the cache stores them)."""
    seeds = view_seeds(view, paths, digests)
    share = distributed.my_share(len(paths))
    features = torch.zeros(len(share), backbone.feature_dim)
    ok = torch.zeros(len(share), dtype=torch.bool)
    device = torch.device(device)
    engine = resolve_engine(engine, device)  # an unknown engine, or ONNX on a GPU, refused before any export
    engine = usable_engine(backbone, engine, device, num_workers)
    for where, rows in frozen_pass(backbone, [paths[i] for i in share], view, device=device,
                                   seeds=[seeds[i] for i in share], batch_size=batch_size,
                                   num_workers=num_workers, progress=progress, engine=engine):
        features[where], ok[where] = rows, True
    if distributed.world_size() == 1:
        return features, ok
    # Gathered as stored (float16: half the traffic) and as uint8 (gloo has no bool).
    features = distributed.gather_shares(stored(features), len(paths)).float()
    return features, distributed.gather_shares(ok.to(torch.uint8), len(paths)).bool()
