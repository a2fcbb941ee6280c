"""From a photo to the top-K flower names: `process_image`, `predict`, and `imshow` to look back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .backbones import Preprocessing
from .data import eval_transform, load_image
from .errors import UserError
from .runtime import Prediction, check_top_k, select_top_k  # torch-free, shared with ONNX inference


def process_image(image: str | Path | Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """Shorter side to resize_size, centre crop, normalize: the evaluation transform. -> (3, S, S)"""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return eval_transform(preprocessing)(image)


def imshow(image: torch.Tensor, preprocessing: Preprocessing, ax=None, title: str | None = None):
    """Show a processed image tensor (3, S, S) as the photo it came from (undoing the normalization)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    array = image.detach().cpu().numpy().transpose((1, 2, 0))  # (S, S, 3)
    array = array * np.array(preprocessing.std) + np.array(preprocessing.mean)
    ax.imshow(np.clip(array, 0, 1))
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def check_model(model) -> None:
    if isinstance(model, tuple):
        raise UserError("load_model returns (model, checkpoint): pass the model, e.g. "
                        "`model, ckpt = load_model(path)`")
    missing = [a for a in ("classes", "preprocessing", "cat_to_name") if not hasattr(model, a)]
    if missing:
        raise UserError(f"predict needs a model from load_model or build_model (got a {type(model).__name__} "
                        f"without {', '.join(missing)})")


@torch.inference_mode()
def predict_tensor(model, images: torch.Tensor, top_k: int = 5) -> list[Prediction]:
    """Top-K for a batch of processed images (N, 3, S, S), with the model's classes and names."""
    check_model(model)
    check_top_k(top_k, len(model.classes))
    device = next(model.head.parameters()).device
    probs = torch.softmax(model.eval()(images.to(device)).float(), dim=1)  # (N, num_classes)
    # The same selection as ONNX inference, so both answer alike on equal probabilities.
    return [select_top_k(row, model.classes, model.cat_to_name, top_k) for row in probs.cpu().numpy()]


def predict(image_path: str | Path | Image.Image, model, top_k: int = 5) -> Prediction:
    """The classic project's `predict(image_path, model, topk)`, here spelt `top_k`: top-K
    probabilities, categories and names. `model` comes from `load_model` (or `build_model`), which
    attach the classes, names and preprocessing it needs."""
    check_model(model)
    image = process_image(image_path, model.preprocessing)
    return predict_tensor(model, image.unsqueeze(0), top_k)[0]
