"""The new classifier head, and the frozen backbone + head pair that predicts from images."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .images import Preprocessing


def build_head(in_features: int, hidden_units: Sequence[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Feed-forward head: [Linear -> ReLU -> Dropout] per hidden size, then Linear to class logits."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden_units:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class FlowerClassifier(nn.Module):
    """Frozen backbone, trainable head. Outputs logits (N, num_classes).

    A model built from a checkpoint also knows what prediction needs: `classes` (output index ->
    category folder), `cat_to_name` (category -> flower name), the backbone's `preprocessing` and
    the `calibration` (`calibration.Calibration`, or None for a checkpoint saved before it).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, classes: Sequence[str] | None = None,
                 cat_to_name: dict[str, str] | None = None, preprocessing: Preprocessing | None = None,
                 calibration=None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classes = list(classes) if classes is not None else None
        self.cat_to_name = cat_to_name
        self.preprocessing = preprocessing
        self.calibration = calibration

    def train(self, mode: bool = True) -> "FlowerClassifier":
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics must not drift while the head trains
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the backbone never learns, so keep no graph for it
            return self.backbone(images)  # (N, 3, S, S) -> (N, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def count_parameters(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}
