"""The backbone stays frozen; only the head learns; the head has the asked-for shape."""
import urllib.error

import pytest
import torch
from torch import nn

from flower_classifier.backbones import BACKBONES, build_backbone
from flower_classifier.errors import UserError
from flower_classifier.model import FlowerClassifier, build_head, count_parameters
from flower_classifier.training import make_optimizer
from flower_classifier.config import TrainConfig


def test_head_layers_follow_hidden_units():
    head = build_head(100, [64, 32], 12, 0.3)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(100, 64), (64, 32), (32, 12)]
    assert sum(isinstance(m, nn.ReLU) for m in head) == 2
    assert all(m.p == 0.3 for m in head if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("arch", ["tiny", "efficientnet_lite0"])
def test_training_steps_change_only_the_head(arch):
    backbone = build_backbone(arch)
    model = FlowerClassifier(backbone.module, build_head(backbone.feature_dim, [32], 5, 0.2))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # weights and BN stats
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    optimizer = make_optimizer(model.head, TrainConfig(arch=arch, learning_rate=0.01))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    model.train()
    assert not model.backbone.training and model.head.training
    size = backbone.preprocessing.input_size
    for _ in range(3):
        images, targets = torch.randn(4, 3, size, size) * 3 + 1, torch.randint(0, 5, (4,))
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean/var included
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.head.parameters())


@pytest.mark.parametrize("arch", [a for a in BACKBONES if not a.startswith("efficientnet_lite") or a == "efficientnet_lite0"])
def test_every_backbone_reports_its_true_feature_size(arch):
    pretrained = arch in ("tiny", "efficientnet_lite0")  # the others would download
    backbone = build_backbone(arch, pretrained=pretrained)
    size = backbone.preprocessing.input_size
    with torch.inference_mode():
        features = backbone.module(torch.zeros(1, 3, size, size))
    assert features.shape == (1, backbone.feature_dim)
    assert backbone.preprocessing.resize_size >= size


def test_lite0_uses_its_own_normalization_and_real_weights():
    backbone = build_backbone("efficientnet_lite0")
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.std == (0.5, 0.5, 0.5)
    random_init = build_backbone("efficientnet_lite0", pretrained=False)
    w, r = backbone.module.state_dict(), random_init.module.state_dict()
    assert not torch.equal(w["net._conv_stem.weight"], r["net._conv_stem.weight"])


def test_offline_download_names_the_offline_choice(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        build_backbone("densenet121")
    message = str(e.value)
    assert "could not download" in message and "--arch efficientnet_lite0" in message
    assert "\n" not in message


def test_torchvision_weights_come_from_its_cache(tmp_path, monkeypatch):
    """The real torchvision loading path, fed a cached weights file the test writes."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.EfficientNet_B0_Weights.DEFAULT
    reference = torchvision.models.efficientnet_b0()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    backbone = build_backbone("efficientnet_b0")
    assert torch.equal(backbone.module.features[0][0].weight, reference.features[0][0].weight)


def test_unknown_arch_lists_choices():
    with pytest.raises(UserError, match="unknown --arch 'vgg99'.*vgg16"):
        build_backbone("vgg99")
