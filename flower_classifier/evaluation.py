"""Accuracy of a saved checkpoint on a folder of labelled photos (one split)."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_model
from .data import FlowerFolder, eval_transform, make_loader
from .errors import UserError
from .training import evaluate


def evaluate_checkpoint(checkpoint_path: str | Path, split_path: str | Path, *, device="cpu",
                        batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> dict:
    """Top-1 / top-5 accuracy, image count and unreadable (skipped) images of a checkpoint on a split."""
    model, ckpt = load_model(checkpoint_path, device)
    split_path = Path(split_path)
    if not split_path.is_dir():
        raise UserError(f"{split_path}: no such directory; expected a split folder such as DATA/test")
    dataset = FlowerFolder(split_path, transform=eval_transform(ckpt.preprocessing), classes=ckpt.classes)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    metrics = evaluate(model, loader, torch.device(device), desc="evaluate", progress=progress)
    return {**metrics, "skipped": len(dataset.skipped())}
