"""Where each backbone can be cut: its stem, its blocks (the repeated units: MBConv blocks,
bottlenecks, encoder layers...) and its tail, per architecture, and the two parts of a cut
(`bottom`, `top`). Pure module wiring, no weights: `backbones` builds the models and names which
stack function describes each.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class BlockStack(NamedTuple):
    """A feature extractor as a chain: features = tail(blocks(stem(images))), each a list of modules run in turn."""

    stem: list[nn.Module]  # below the first block, never fine-tuned
    blocks: list[nn.Module]  # the repeated units, bottom to top; the last n can be fine-tuned
    tail: list[nn.Module]  # the last block's output -> features (final conv or norm, pooling, flatten)


def conv_units(layers: nn.Sequential) -> list[nn.Module]:
    """Conv + what follows it up to the next conv (norm, ReLU, and a pooling that ends a stage)."""
    units: list[list[nn.Module]] = []
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            units.append([])
        units[-1].append(layer)
    return [nn.Sequential(*unit) for unit in units]


def vgg_stack(m: nn.Module) -> BlockStack:
    features, avgpool, flatten = m
    return BlockStack([], conv_units(features), [avgpool, flatten])


def resnet_stack(m: nn.Module) -> BlockStack:
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    return BlockStack([m.conv1, m.bn1, m.relu, m.maxpool], blocks, [m.avgpool, nn.Flatten()])


class _DenseUnit(nn.Module):
    """One DenseNet layer: its new channels joined to everything before it, as its dense block does."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer(x)], 1)


def densenet_stack(m: nn.Module) -> BlockStack:
    children = dict(m.features.named_children())
    blocks: list[nn.Module] = []
    for i in range(1, 5):
        blocks += [_DenseUnit(layer) for layer in children[f"denseblock{i}"].values()]
        if f"transition{i}" in children:  # it halves the map: cut after it, cache the smaller one
            blocks[-1] = nn.Sequential(blocks[-1], children[f"transition{i}"])
    stem = [children[name] for name in ("conv0", "norm0", "relu0", "pool0")]
    return BlockStack(stem, blocks, [children["norm5"], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()])


def efficientnet_stack(m: nn.Module) -> BlockStack:
    """torchvision EfficientNet B0 / V2: features[0] is the stem, the last is the 1x1 conv to 1280."""
    blocks = [b for stage in m.features[1:-1] for b in stage]  # MBConv / FusedMBConv
    return BlockStack([m.features[0]], blocks, [m.features[-1], m.avgpool, nn.Flatten()])


def regnet_stack(m: nn.Module) -> BlockStack:
    return BlockStack([m.stem], [b for stage in m.trunk_output for b in stage], [m.avgpool, nn.Flatten()])


def convnext_stack(m: nn.Module) -> BlockStack:
    """features: stem, stage, downsample, stage, ...: a downsample ends the stage before it."""
    blocks: list[nn.Module] = []
    for i, stage in enumerate(m.features[1:], start=1):
        if i % 2:
            blocks += list(stage)  # CNBlocks
        else:
            blocks[-1] = nn.Sequential(blocks[-1], stage)
    norm, flatten = m.classifier[0], m.classifier[1]
    return BlockStack([m.features[0]], blocks, [m.avgpool, norm, flatten])


class _VitEmbed(nn.Module):
    """Below the first encoder layer: patches -> tokens, the class token in front, positions added."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_size, self.hidden_dim = vit.patch_size, vit.hidden_dim
        self.conv_proj, self.dropout = vit.conv_proj, vit.encoder.dropout
        self.class_token, self.pos_embedding = vit.class_token, vit.encoder.pos_embedding  # shared, not copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.patch_size
        grid = (x.shape[2] // p) * (x.shape[3] // p)
        x = self.conv_proj(x).reshape(n, self.hidden_dim, grid).permute(0, 2, 1)  # (N, grid, D)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)  # (N, 1 + grid, D)
        return self.dropout(x + self.pos_embedding)


class _ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]  # (N, 1 + grid, D) -> (N, D)


def vit_stack(m: nn.Module) -> BlockStack:
    return BlockStack([_VitEmbed(m)], list(m.encoder.layers), [m.encoder.ln, _ClassToken()])


def tiny_stack(m: nn.Module) -> BlockStack:
    return BlockStack([], conv_units(m.layers[:-2]), list(m.layers[-2:]))  # tail: pool, flatten


# ---------------------------------------------------------------- EfficientNet-Lite (efficientnet_lite_pytorch)

class _LiteBlock(nn.Module):
    """An MBConv block with the drop-connect rate `extract_features` gives it (it acts in training only)."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block, self.drop_connect_rate = block, drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect_rate)


def lite_stack(m: nn.Module) -> BlockStack:
    net = m.net
    rate, count = net._global_params.drop_connect_rate, len(net._blocks)
    blocks = [_LiteBlock(b, rate * (float(i) / count) if rate else rate) for i, b in enumerate(net._blocks)]
    return BlockStack([net._conv_stem, net._bn0, net._swish], blocks,
                      [net._conv_head, net._bn1, net._swish, m.pool])


# ---------------------------------------------------------------- a cut

def bottom(stack: BlockStack, n: int) -> nn.Sequential:
    return nn.Sequential(*stack.stem, *stack.blocks[:len(stack.blocks) - n])


def top(stack: BlockStack, n: int) -> nn.Sequential:
    return nn.Sequential(*stack.blocks[len(stack.blocks) - n:], *stack.tail) if n else nn.Sequential()
