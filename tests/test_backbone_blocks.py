"""Backbone blocks: a split at any n reproduces the backbone exactly, freezes the bottom and trains the
top; the modern torchvision backbones bring their own weights' preprocessing and fail clearly offline.

All with random weights (nothing downloads), one image per forward pass.
"""
import urllib.error

import pytest
import torch
import torchvision
from efficientnet_lite_pytorch.model import MBConvBlock
from torch import nn
from torchvision.models import convnext, densenet, efficientnet, regnet, resnet, vision_transformer

from flower_classifier.backbones import BACKBONES, build_backbone, describe, get_spec, split_backbone
from flower_classifier.errors import UserError

# The architecture's own repeated unit: every instance must be exactly one block.
BLOCK_TYPES = {
    "vgg16": nn.Conv2d, "vgg13": nn.Conv2d, "tiny": nn.Conv2d,
    "resnet50": resnet.Bottleneck, "densenet121": densenet._DenseLayer,
    "efficientnet_b0": efficientnet.MBConv, "efficientnet_v2_s": (efficientnet.MBConv, efficientnet.FusedMBConv),
    "convnext_tiny": convnext.CNBlock, "regnet_y_16gf": regnet.ResBottleneckBlock,
    "vit_b_16": vision_transformer.EncoderBlock,
    "efficientnet_lite0": MBConvBlock, "efficientnet_lite1": MBConvBlock, "efficientnet_lite2": MBConvBlock,
}

# The modern backbones and the weights whose preprocessing they must use.
MODERN = {
    "vit_b_16": torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1,
    "regnet_y_16gf": torchvision.models.RegNet_Y_16GF_Weights.IMAGENET1K_SWAG_LINEAR_V1,
    "convnext_tiny": torchvision.models.ConvNeXt_Tiny_Weights.DEFAULT,
    "efficientnet_v2_s": torchvision.models.EfficientNet_V2_S_Weights.DEFAULT,
}


# The costliest run on a smaller image (ViT needs its own size); SCALE: how much smaller each side is.
SCALE = {"vgg16": 3.5, "vgg13": 3.5, "regnet_y_16gf": 3.5, "efficientnet_v2_s": 3}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _forward_noting_parameters(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """The output and the parameters used to make it (the Lite package keeps an unused classifier)."""
    used: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: used.update(_ids(m.parameters(recurse=False))))
             for m in module.modules()]
    with torch.inference_mode():
        output = module(x)
    for hook in hooks:
        hook.remove()
    return output, used


def test_every_backbone_names_its_block_type():
    assert set(BLOCK_TYPES) == set(BACKBONES)


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_split_at_any_depth_reproduces_the_backbone_exactly(arch):
    spec = get_spec(arch)
    backbone = build_backbone(arch, pretrained=False)
    stack = spec.stack(backbone.module)
    k = len(stack.blocks)
    block_type = BLOCK_TYPES[arch]
    assert sum(isinstance(m, block_type) for m in backbone.module.modules()) == k == spec.num_blocks
    assert all(sum(isinstance(m, block_type) for m in block.modules()) == 1 for block in stack.blocks)
    scale = SCALE.get(arch, 1)
    size = round(spec.preprocessing().input_size / scale)
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    expected, used = _forward_noting_parameters(backbone.module, x)
    assert expected.shape == (1, spec.feature_dim) and spec.split_shapes[0] == (spec.feature_dim,)
    for n in sorted({0, 1, 2, k}):
        bottom, top = split_backbone(backbone, n)
        assert not _ids(bottom.parameters()) & _ids(top.parameters())
        assert used <= _ids(bottom.parameters()) | _ids(top.parameters())
        assert not any(p.requires_grad for p in bottom.parameters())
        assert not any(m.training for m in bottom.modules())
        assert all(p.requires_grad for p in top.parameters()) and (n == 0) == (not list(top.parameters()))
        if n == 0:  # the frozen backbone as it is, features passed through
            assert bottom is backbone.module and len(top) == 0
            continue
        with torch.inference_mode():
            activation = bottom(x)
            kept = activation.clone()
            got = top(activation)
        shape = spec.split_shapes[n]  # at the input size: (C, H, W), or (tokens, width) for ViT
        assert tuple(activation.shape[1:]) == shape[:1] + tuple(round(d / scale) for d in shape[1:]), n
        assert torch.equal(got, expected), n
        assert torch.equal(activation, kept), n  # the top must not write into what a cache would hold


@pytest.mark.parametrize("arch", ["tiny", "efficientnet_lite0"])
def test_gradients_reach_the_top_blocks_only(arch):
    backbone = build_backbone(arch, pretrained=False)
    bottom, top = split_backbone(backbone, 2)
    top.train()
    size = backbone.preprocessing.input_size
    with torch.no_grad():
        activation = bottom(torch.randn(2, 3, size, size))
    top(activation).square().sum().backward()
    assert all(p.grad is None for p in bottom.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters())


def test_split_by_name_and_a_depth_out_of_range():
    bottom, top = split_backbone("tiny", 1)
    assert isinstance(top[0][0], nn.Conv2d) and len(bottom) == 1
    for n in (-1, 3):
        with pytest.raises(UserError) as e:
            split_backbone("tiny", n)
        assert str(e.value) == f"--finetune {n}: tiny has 2 blocks; choose 0 (frozen backbone) to 2"


def test_describe_says_blocks_and_cached_activation_size():
    spec = get_spec("efficientnet_lite0")
    lines = describe(spec).splitlines()
    assert len(lines) == 2 and lines[0].startswith("efficientnet_lite0 ")
    for n in (1, 2):
        c, h, w = spec.split_shapes[n]
        assert f"n={n} {c}x{h}x{w} = {c * h * w:,} numbers, {c * h * w * 2 / 1e6:.3g} MB" in lines[1]
    assert f"{spec.num_blocks} blocks;" in lines[1]


@pytest.mark.parametrize("arch", list(MODERN))
def test_modern_backbones_use_their_weights_preprocessing(arch):
    expected = MODERN[arch].transforms()
    p = get_spec(arch).preprocessing()
    assert (p.input_size, p.resize_size) == (expected.crop_size[0], expected.resize_size[0])
    assert p.mean == tuple(expected.mean) and p.std == tuple(expected.std)
    assert p.interpolation == expected.interpolation.value


def test_swag_linear_weights_take_224_px_bicubic():
    """Not the 384 px of the end-to-end SWAG weights: the linear-probe ones resize and crop to 224."""
    for arch in ("vit_b_16", "regnet_y_16gf"):
        p = get_spec(arch).preprocessing()
        assert (p.input_size, p.resize_size, p.interpolation) == (224, 224, "bicubic")


@pytest.mark.parametrize("arch", list(MODERN))
def test_modern_backbones_say_whether_their_weights_are_cached(arch, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    spec = get_spec(arch)
    assert spec.weights_status() == "weights download on first use (needs internet once)"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / MODERN[arch].url.rsplit("/", 1)[1]).write_bytes(b"")
    assert spec.weights_status() == "weights cached"


@pytest.mark.parametrize("arch", list(MODERN))
def test_modern_backbones_offline_say_what_to_do(arch, monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        build_backbone(arch)
    message = str(e.value)
    assert f"could not download the pretrained {arch} weights from {MODERN[arch].url}" in message
    assert "--arch efficientnet_lite0" in message and "\n" not in message
