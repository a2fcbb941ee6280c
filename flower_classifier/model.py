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
        # No graph is kept for the frozen layers (none of their parameters asks for gradients); the
        # fine-tuned top blocks (`--finetune`) do get one.
        return self.backbone(images)  # (N, 3, S, S) -> (N, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class TunedHead(nn.Module):
    """What trains on the cached path: the backbone's top blocks (`backbones.split_backbone`; an empty
    `nn.Sequential()` for a frozen backbone) and the head, on rows of cached activations.

    Rows arrive flat (N, prod(shape)), as the store keeps them; `shape` is one activation's shape
    below the split. The top stays in eval mode: its BatchNorm layers keep their pretrained
    statistics (batches of 32 photos of a few species would make poor estimates of them) and its
    stochastic depth is off, so the only change to the blocks is what the optimizer makes.
    """

    def __init__(self, top: nn.Module, head: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.top = top
        self.head = head
        self.shape = tuple(shape)

    def train(self, mode: bool = True) -> "TunedHead":
        super().train(mode)
        self.top.eval()
        return self

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        return self.top(rows.view(len(rows), *self.shape))  # (N, D): what the head sees

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(rows))


class StackedHeads(nn.Module):
    """K heads of one shape (`build_head`'s) trained at once, each with its own weights: features
    (N, D) -> logits (N, C, K), head k's in [:, :, k]. One step of all K costs about one step of one
    plus the K-fold arithmetic, instead of K steps: calibration's fold heads train this way, through
    the same loop as the head (a target of -100, the loss's ignore_index, leaves a head out of a row).
    AdamW and dropout act per element, so each head trains as it would alone."""

    def __init__(self, heads: list[nn.Sequential]):
        super().__init__()
        linear = [[m for m in head if isinstance(m, nn.Linear)] for head in heads]
        dropout = [m.p for m in heads[0] if isinstance(m, nn.Dropout)]
        self.dropout = dropout[0] if dropout else 0.0
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([h[i].weight.detach() for h in linear]))
                                        for i in range(len(linear[0])))  # each (K, out, in)
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([h[i].bias.detach() for h in linear]))
                                       for i in range(len(linear[0])))  # each (K, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out, d = self.weights[0].shape
        # One (N, D) x (D, K * H) product for the first layer, which all K heads read the same x through:
        # the 5 fold heads trained in half the time an einsum took (docs/benchmarks.md).
        h = (x @ self.weights[0].reshape(k * out, d).t()).view(-1, k, out).transpose(0, 1)  # (K, N, H)
        h = h + self.biases[0][:, None]
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = nn.functional.dropout(torch.relu(h), self.dropout, self.training)
            h = torch.baddbmm(b[:, None], h, w.transpose(1, 2))  # (K, N, out)
        return h.permute(1, 2, 0)  # (N, C, K)


def count_parameters(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}
