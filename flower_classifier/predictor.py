"""From a photo to its top-K flower names: one interface for a checkpoint (.pth, PyTorch) and an
exported .onnx file (ONNX Runtime), and the classic notebook API (`process_image`, `predict`, `imshow`).

    predictor = load_predictor("model.onnx")          # or "checkpoints/checkpoint.pth"
    predictor.predict("photo.jpg").rows()             # [(name, category, probability), ...]
    for result in predictor.predict_many(paths):      # batched; an unreadable photo is named, not fatal
        print(result.photo, result.error or result.prediction.rows())

Torch is imported only for a checkpoint: `predict.py photo.jpg model.onnx` and `serve model.onnx`
need Pillow, numpy and onnxruntime alone, start in a fraction of the time and fit a small container.
Both backends share the decoding and the numpy preprocessing (`images.preprocess`, held equal to the
torchvision evaluation transform by a test), so they differ only in who runs the network: each gives
logits and the backbone's features, and `calibration.Calibration.assess` turns them into calibrated
probabilities and the "not one of my species" answer, the same way for both.

Test-time augmentation (`tta=True`, `--tta`) is done here once for both backends and for evaluation
(`average_views`): the model also sees the photo mirrored left-right, and the logits and features
are averaged over the two views before the calibration reads them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from .calibration import Calibration
from .devices import chosen_threads
from .errors import UserError
from .files import check_regular_file
from .images import Preprocessing, decode_image, preprocess, to_rgb

ONNX_FORMAT = "flower_classifier.onnx"
# 2: outputs logits and features, metadata "calibration". 1: outputs probabilities, no calibration.
ONNX_FORMAT_VERSION = 2
DEFAULT_TOP_K = 5  # "up to 5": a model with fewer categories shows them all


class NonFiniteOutput(UserError):
    """The model gave nan or inf: its weights are broken, whatever the photo."""


@dataclass
class Prediction:
    probabilities: list[float]  # most likely first
    categories: list[str]  # category folder names ("1".."102" for Oxford 102)
    names: list[str]  # flower names, or the category numbers when no names are known
    unknown: bool | None = None  # not one of the species the model knows; None: not asked (no calibration, --no_unknown)
    score: float | None = None  # the unknown score (higher = less like the species); None without calibration

    def rows(self) -> list[tuple[str, str, float]]:
        return list(zip(self.names, self.categories, self.probabilities))


@dataclass
class PhotoResult:
    """One photo of `Predictor.predict_many`: its prediction, or why it was skipped."""

    photo: str  # the path as given
    prediction: Prediction | None = None
    error: str | None = None  # one line naming the photo and what is wrong with it


def mirrored(images: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) -> the same photos flipped left-right (a flower has no handedness)."""
    return images[..., ::-1]


# The views test-time augmentation adds to the photo itself: the mirror image only. On the 300-photo
# sample (bench/bench_tta.py, README "Test-time augmentation") a zoomed-in crop, 5 crops or a wider
# crop, with or without their mirrors, cost 2-7x a plain pass and gained nothing the mirror did not.
TTA_VIEWS = (mirrored,)


def average_views(outputs, images: np.ndarray, views=TTA_VIEWS) -> tuple[np.ndarray, np.ndarray]:
    """`outputs` (images -> logits (N, C), features (N, D)) averaged over `images` (N, 3, S, S) and
    its `views`, in one run of the model on all of them.

    Logits and features are averaged, not probabilities: the result has the shape and meaning of one
    photo's outputs, so the checkpoint's temperature and unknown score apply to it as they are. For
    a linear head the averaged logits are the head of the averaged features.
    """
    batch = np.concatenate([images, *(view(images) for view in views)])  # (V * N, 3, S, S), contiguous
    logits, features = outputs(batch)
    n = len(images)
    return (logits.reshape(-1, n, logits.shape[1]).mean(axis=0, dtype=np.float32),
            features.reshape(-1, n, features.shape[1]).mean(axis=0, dtype=np.float32))


def check_top_k(top_k: int | None, num_classes: int, *, option: str = "--top_k") -> int:
    """How many rows to show: None means up to DEFAULT_TOP_K; a number asked for must fit the model."""
    if top_k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise UserError(f"{option} must be an integer (got {top_k!r})")
    if not 1 <= top_k <= num_classes:
        raise UserError(f"{option} must be between 1 and the model's {num_classes} categories (got {top_k})")
    return int(top_k)


class Predictor:
    """A model with what it needs to answer: its categories, their names, its preprocessing.
    `predict` is safe to call from several threads at once; nothing here changes after loading."""

    backend = ""  # "pytorch" or "onnx"

    def __init__(self, *, arch: str, classes: list[str], cat_to_name: dict[str, str] | None,
                 preprocessing: Preprocessing, source: str, calibration: Calibration | None):
        self.arch, self.classes, self.cat_to_name = arch, list(classes), cat_to_name
        self.preprocessing, self.source = preprocessing, source  # source: the file, for messages
        # None (saved before calibration existed): temperature 1 and no unknown answer.
        self.calibration = calibration

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, num_classes) and backbone features (N, D) for preprocessed images (N, 3, S, S) float32."""
        raise NotImplementedError

    def view_outputs(self, images: np.ndarray, *, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`outputs`, or with `tta` their average over the photo and its TTA_VIEWS (`average_views`)."""
        return average_views(self.outputs, images) if tta else self.outputs(images)

    def probabilities(self, images: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """(N, num_classes) calibrated probabilities for preprocessed images (N, 3, S, S) float32."""
        return (self.calibration or Calibration()).probabilities(self.view_outputs(images, tta=tta)[0])

    def answer(self, images: np.ndarray, top_k: int | None = None, *, unknown: bool = True,
               tta: bool = False) -> list[Prediction]:
        """Top-K rows of calibrated probabilities for preprocessed images (N, 3, S, S), and whether each
        is none of the species (`unknown=False`, or no calibration: not asked); `tta`: see `average_views`."""
        logits, features = self.view_outputs(images, tta=tta)
        if self.calibration is None:
            return [self.top_k(row, top_k) for row in Calibration().probabilities(logits)]
        self.refuse_non_finite(features)
        assessed = self.calibration.assess(logits, features)
        return [self._with_unknown(self.top_k(row, top_k), bool(flag), float(score), unknown)
                for row, flag, score in zip(assessed.probabilities, assessed.unknown, assessed.scores)]

    @staticmethod
    def _with_unknown(prediction: Prediction, flag: bool, score: float, asked: bool) -> Prediction:
        prediction.score = score
        prediction.unknown = flag if asked else None
        return prediction

    def prepare(self, image: str | Path | bytes | Image.Image, *, label: str | None = None) -> np.ndarray:
        """A photo (path, a file's bytes, or a PIL image) as the model's input (3, S, S). Large JPEGs
        are decoded at reduced size, never below the resize target."""
        if not isinstance(image, Image.Image):
            image = decode_image(image, label=label, min_size=self.preprocessing.resize_size)
        return preprocess(to_rgb(image), self.preprocessing)

    def refuse_non_finite(self, outputs: np.ndarray) -> None:
        if not np.all(np.isfinite(outputs)):
            raise NonFiniteOutput(f"{self.source}: the model's outputs are not finite numbers (nan or inf); "
                                  f"its weights are broken: retrain it, or export it again")

    def top_k(self, probabilities: np.ndarray, top_k: int | None = None) -> Prediction:
        """The most likely rows of one probability vector (num_classes,)."""
        self.refuse_non_finite(probabilities)
        k = check_top_k(top_k, len(self.classes))
        order = np.argsort(-probabilities, kind="stable")[:k]  # stable: ties keep category order
        categories = [self.classes[i] for i in order]
        names = self.cat_to_name or {}
        return Prediction([float(probabilities[i]) for i in order], categories, [names.get(c, c) for c in categories])

    def predict_batch(self, images: list, top_k: int | None = None, *, unknown: bool = True,
                      tta: bool = False) -> list[Prediction]:
        check_top_k(top_k, len(self.classes))  # before any decoding
        return self.answer(np.stack([self.prepare(image) for image in images]), top_k, unknown=unknown, tta=tta)

    def predict(self, image: str | Path | bytes | Image.Image, top_k: int | None = None, *,
                unknown: bool = True, tta: bool = False) -> Prediction:
        """Top-K names and calibrated probabilities for a photo (a path, a file's bytes, or a PIL
        image), and whether it is none of the species (`unknown=False`: not asked). `tta=True`: the
        photo and its mirror image, averaged (about twice the time; see `average_views`)."""
        return self.predict_batch([image], top_k, unknown=unknown, tta=tta)[0]

    def predict_many(self, photos: Iterable[str | Path], top_k: int | None = None, *,
                     batch_size: int = 16, unknown: bool = True, tta: bool = False) -> Iterator[PhotoResult]:
        """Top-K for each photo path, in order, the model run on up to `batch_size` photos at a time
        (with `tta`, on their views too). A photo that cannot be read comes back with its `error`
        instead of stopping the others."""
        check_top_k(top_k, len(self.classes))  # before any decoding
        ready: list[tuple[str, np.ndarray]] = []  # (photo, its input (3, S, S)), waiting for a model run

        def run() -> list[PhotoResult]:
            if not ready:
                return []
            answers = self.answer(np.stack([array for _, array in ready]), top_k, unknown=unknown, tta=tta)
            results = [PhotoResult(photo, answer) for (photo, _), answer in zip(ready, answers)]
            ready.clear()
            return results

        for photo in photos:
            try:
                ready.append((str(photo), self.prepare(photo)))
            except UserError as e:
                yield from run()  # the photos before it first: results come in the order given
                yield PhotoResult(str(photo), error=str(e))
                continue
            if len(ready) == batch_size:
                yield from run()
        yield from run()

    def check_finite(self) -> None:
        """Refuse a model whose output on a plain grey photo is not finite: broken weights answer nan
        for every photo, and should be named at load, not as a null probability per request."""
        size = self.preprocessing.input_size
        self.answer(self.prepare(Image.new("RGB", (size, size), (128, 128, 128)))[None])


class OnnxPredictor(Predictor):
    """An exported model (backbone + head, giving logits and features); its metadata (classes, names,
    preprocessing, calibration) is validated as data. A version-1 file (probabilities out, no
    calibration) still loads. ONNX Runtime's Run is thread-safe."""

    backend = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("running an .onnx model needs onnxruntime: `pip install onnxruntime`") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model {path} not found; make one with `python -m flower_classifier export`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or chosen_threads() or os.cpu_count() or 1  # chosen: --threads
        options.log_severity_level = 3  # errors only
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a foreign file
            raise UserError(f"{path}: not an ONNX model ({str(e)[:120]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != ONNX_FORMAT:
            raise UserError(f"{path}: an ONNX model, but not one exported by this project "
                            f"(no '{ONNX_FORMAT}' metadata); export it with `python -m flower_classifier export`")
        version = meta.get("format_version", "")
        if not (version.isascii() and version.isdigit() and int(version) >= 1):
            raise UserError(f"{path}: metadata format_version must be a positive integer (got {version!r}); "
                            f"export the model again")
        if int(version) > ONNX_FORMAT_VERSION:
            raise UserError(f"{path}: format version {version} is newer than this code reads "
                            f"({ONNX_FORMAT_VERSION}); update flower_classifier")
        image, output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        classes = _metadata_json(path, meta, "classes")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
            raise UserError(f"{path}: metadata classes must be a list of category names (strings)")
        if len(set(classes)) != len(classes):
            raise UserError(f"{path}: metadata classes lists a category twice")
        self.version = int(version)
        outputs = [o.name for o in self.session.get_outputs()]
        if self.version >= 2 and outputs[:2] != ["logits", "features"]:
            raise UserError(f"{path}: format version {version} must output logits and features (got "
                            f"{', '.join(outputs)}); export the model again")
        if isinstance(output.shape[-1], int) and output.shape[-1] != len(classes):
            raise UserError(f"{path}: metadata lists {len(classes)} classes but the model has "
                            f"{output.shape[-1]} outputs")
        names = _metadata_json(path, meta, "cat_to_name", default=None)
        if names is not None and not (isinstance(names, dict) and all(isinstance(v, str) for v in names.values())):
            raise UserError(f"{path}: metadata cat_to_name must be a mapping of category -> flower name, or null")
        preprocessing = Preprocessing.from_dict(_metadata_json(path, meta, "preprocessing"), where=str(path))
        if image.shape[-1] != preprocessing.input_size:
            raise UserError(f"{path}: metadata preprocessing input_size {preprocessing.input_size} differs from "
                            f"the model's input size {image.shape[-1]}")
        arch = meta.get("arch", "")
        calibration = None
        if self.version >= 2 and _metadata_json(path, meta, "calibration", default=None) is not None:
            features = self.session.get_outputs()[1].shape[-1]
            calibration = Calibration.from_dict(_metadata_json(path, meta, "calibration"), where=str(path),
                                                num_classes=len(classes),
                                                feature_dim=features if isinstance(features, int) else None)
        super().__init__(arch=arch, classes=classes, cat_to_name=names, preprocessing=preprocessing,
                         source=str(path), calibration=calibration)
        self.input_name = image.name

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.session.run(None, {self.input_name: images.astype(np.float32, copy=False)})
        if self.version == 1:  # probabilities only: their logarithm gives back the same softmax
            return np.log(np.maximum(out[0], 1e-30)), np.zeros((len(images), 0), dtype=np.float32)
        return out[0], out[1]


def _metadata_json(path: Path, meta: dict, key: str, **default):
    if key not in meta:
        if default:
            return default["default"]
        raise UserError(f"{path}: metadata lacks {key}; export the model again")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata {key} is not valid JSON; export the model again") from None


class TorchPredictor(Predictor):
    """A FlowerClassifier (from a checkpoint) on a device. Put in eval mode once, here: requests never
    change it, and torch's inference from several threads at once is safe."""

    backend = "pytorch"

    def __init__(self, model, *, arch: str = "", source: str = "model"):
        check_model(model)
        super().__init__(arch=arch, classes=model.classes, cat_to_name=model.cat_to_name,
                         preprocessing=model.preprocessing, source=source,
                         calibration=getattr(model, "calibration", None))
        self.model = model.eval()
        self.device = next(model.head.parameters()).device

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            features = self.model.features(torch.from_numpy(images).to(self.device))  # (N, D)
            logits = self.model.head(features)  # (N, num_classes)
            return logits.float().cpu().numpy(), features.float().cpu().numpy()


def load_predictor(path: str | Path, *, device="cpu", threads: int | None = None,
                   onnx: bool = True) -> Predictor:
    """The model in `path`: an .onnx file runs on ONNX Runtime (CPU, `threads`), anything else is
    read as a checkpoint (PyTorch, on `device`). `onnx=False` for commands that need the checkpoint.
    A model whose outputs are not finite is refused here."""
    check_regular_file(path, "model")  # a FIFO or device: refused unopened
    if onnx and str(path).lower().endswith(".onnx"):
        predictor = OnnxPredictor(path, threads=threads)
    else:
        from .checkpoint import load_model

        model, ckpt = load_model(path, device)
        predictor = TorchPredictor(model, arch=ckpt.arch, source=str(path))
    predictor.check_finite()
    return predictor


# ---------------------------------------------------------------- the classic notebook API

def check_model(model) -> None:
    if isinstance(model, tuple):
        raise UserError("load_model returns (model, checkpoint): pass the model, e.g. "
                        "`model, ckpt = load_model(path)`")
    missing = [a for a in ("classes", "preprocessing") if getattr(model, a, None) is None]
    if missing or not hasattr(model, "head"):
        raise UserError(f"predict needs a model from load_model or build_model (got a {type(model).__name__} "
                        f"without {', '.join(missing or ['head'])})")


def process_image(image: str | Path | Image.Image, preprocessing: Preprocessing):
    """Shorter side to resize_size, centre crop, normalize: the evaluation transform. -> tensor (3, S, S)"""
    import torch

    if not isinstance(image, Image.Image):
        image = decode_image(image, min_size=preprocessing.resize_size)
    return torch.from_numpy(preprocess(to_rgb(image), preprocessing))


def predict(image_path: str | Path | Image.Image, model, top_k: int | None = None) -> Prediction:
    """The classic project's `predict(image_path, model, topk)`, here spelt `top_k` (default: up to
    5): top-K probabilities, categories and names. `model` comes from `load_model` or `build_model`,
    which give it the classes, names and preprocessing it needs."""
    return TorchPredictor(model).predict(image_path, top_k)


def imshow(image, preprocessing: Preprocessing, ax=None, title: str | None = None):
    """Show a processed image (3, S, S) as the photo it came from (undoing the normalization)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image).transpose((1, 2, 0))  # (S, S, 3)
    array = array * np.array(preprocessing.std) + np.array(preprocessing.mean)
    ax.imshow(np.clip(array, 0, 1))
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax
