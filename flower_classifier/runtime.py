"""Inference without torch: decode a photo, preprocess it with numpy, run an exported ONNX model.

This is what an app needs at run time: Pillow, numpy and onnxruntime. Nothing here imports torch,
so `predict.py photo.jpg model.onnx` and `serve model.onnx` start in a fraction of the time and
fit in a small container. The preprocessing equals the torchvision evaluation transform of
`data.eval_transform` (a test holds them to it): shorter side resized with the same Pillow filter,
centre crop, scale to [0, 1], normalize.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .images import decode_image

ONNX_FORMAT = "flower_classifier.onnx"
ONNX_FORMAT_VERSION = 1
_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


@dataclass
class Prediction:
    probabilities: list[float]  # most likely first
    categories: list[str]  # category folder names ("1".."102" for Oxford 102)
    names: list[str]  # flower names, or the category numbers when no names are known

    def rows(self) -> list[tuple[str, str, float]]:
        return list(zip(self.names, self.categories, self.probabilities))


# ---------------------------------------------------------------- photo -> array

def preprocess(image: Image.Image, preprocessing) -> np.ndarray:
    """Shorter side to resize_size, centre crop input_size, normalize. -> float32 (3, S, S)

    `preprocessing` is a `backbones.Preprocessing` or its `to_dict()`; the arithmetic follows
    torchvision's Resize / CenterCrop / ToTensor / Normalize on a Pillow image step by step.
    """
    p = preprocessing if isinstance(preprocessing, dict) else preprocessing.to_dict()
    resize, crop = int(p["resize_size"]), int(p["input_size"])
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize(size, _FILTERS[p.get("interpolation", "bilinear")])
    w, h = image.size
    if w < crop or h < crop:  # only when resize_size < input_size: torchvision pads with zeros
        padded = Image.new("RGB", (max(w, crop), max(h, crop)))
        padded.paste(image, ((max(w, crop) - w) // 2, (max(h, crop) - h) // 2))
        image, (w, h) = padded, padded.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.float32) / np.float32(255)  # (S, S, 3) in [0, 1]
    array = (array - np.asarray(p["mean"], dtype=np.float32)) / np.asarray(p["std"], dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, S, S)


def check_top_k(top_k: int, num_classes: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise UserError(f"--top_k must be an integer (got {top_k!r})")
    if not 1 <= top_k <= num_classes:
        raise UserError(f"--top_k must be between 1 and the model's {num_classes} categories (got {top_k})")
    return top_k


def select_top_k(probabilities: np.ndarray, classes: list[str], cat_to_name: dict | None, k: int) -> Prediction:
    """The k most likely of one probability vector (num_classes,), as a Prediction."""
    check_top_k(k, len(classes))
    order = np.argsort(-probabilities, kind="stable")[:k]
    cats = [classes[i] for i in order]
    names = cat_to_name or {}
    return Prediction([float(probabilities[i]) for i in order], cats, [names.get(c, c) for c in cats])


# ---------------------------------------------------------------- the exported model

class OnnxClassifier:
    """An exported model (backbone + head + softmax) and what its metadata says: classes, names,
    preprocessing. `run` is safe to call from several threads at once (ONNX Runtime's Run is)."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("running an .onnx model needs onnxruntime: `pip install onnxruntime`") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model {path} not found; make one with `python -m flower_classifier export`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
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
        if int(meta.get("format_version", 0)) > ONNX_FORMAT_VERSION:
            raise UserError(f"{path}: format version {meta['format_version']} is newer than this code reads")
        self.path = path
        self.arch = meta.get("arch", "")
        self.classes: list[str] = json.loads(meta["classes"])
        self.cat_to_name: dict[str, str] | None = json.loads(meta.get("cat_to_name", "null"))
        self.preprocessing: dict = json.loads(meta["preprocessing"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) for preprocessed images (N, 3, S, S)."""
        return self.session.run(None, {self.input_name: images.astype(np.float32, copy=False)})[0]

    def predict(self, image: str | Path | bytes | Image.Image, top_k: int = 5) -> Prediction:
        """Top-K names and probabilities for a photo (a path, a file's bytes, or a PIL image)."""
        if not isinstance(image, Image.Image):
            image = decode_image(image)
        probs = self.run(preprocess(image, self.preprocessing)[None])[0]  # (num_classes,)
        return select_top_k(probs, self.classes, self.cat_to_name, top_k)
