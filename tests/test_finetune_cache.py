"""Fine-tuning's cache: the activations below the split are cached like the features (same views,
shards, float16, engines), keyed apart per split, and the frozen default's cache is untouched."""
import numpy as np
import pytest
import torch

from conftest import QUIET, TWELVE, make_dataset
from flower_classifier import features
from flower_classifier.backbones import build_backbone, frozen_part, get_spec, split_backbone
from flower_classifier.data import FlowerFolder, PhotoList

# The keys the frozen backbones' caches had before splits existed: a cache made then is still read.
KEYS_BEFORE_SPLITS = {"tiny": "tiny-30dfc82633c46a9b", "efficientnet_lite0": "efficientnet_lite0-8e521591ab7b3e84"}


@pytest.mark.parametrize("arch", list(KEYS_BEFORE_SPLITS))
def test_the_frozen_default_keeps_its_backbone_and_cache_key(arch):
    backbone = build_backbone(arch)
    assert frozen_part(backbone, 0) is backbone
    assert features.backbone_key(backbone) == KEYS_BEFORE_SPLITS[arch]
    keys = {features.backbone_key(frozen_part(backbone, n)) for n in (0, 1, 2)}
    assert len(keys) == 3 and all(k.startswith(f"{arch}-") for k in keys)
    assert {k.split("-")[1] for k in keys} >= {"below1", "below2"}


def test_a_frozen_part_outputs_flat_activations_and_leaves_the_top_alone():
    backbone = build_backbone("tiny")
    spec = get_spec("tiny")
    for n in (1, 2):
        part = frozen_part(backbone, n)
        assert part.name == "tiny" and part.split == n and part.preprocessing == backbone.preprocessing
        assert part.feature_dim == int(np.prod(spec.split_shapes[n]))
        assert not part.module.training and not any(p.requires_grad for p in part.module.parameters())
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            assert part.module(x).shape == (3, part.feature_dim)
    assert not any(p.requires_grad for p in backbone.module.parameters())  # no top was made trainable
    with pytest.raises(Exception, match="--finetune 3.*2 blocks"):
        frozen_part(backbone, 3)


def _expected_rows(bottom, paths, view, digests):
    """The bottom run on each photo's view, flattened: what the cache must hold (before float16)."""
    seeds = [view.seed(d) for d in digests]
    images = torch.stack([PhotoList([(p, 0)], view.transform, [s], min_size=view.min_size)[0][0]
                          for p, s in zip(paths, seeds)])
    with torch.inference_mode():
        return bottom(images).flatten(1)


@pytest.mark.parametrize("engine", ["torch", "onnx"])
@pytest.mark.parametrize("arch, n", [("tiny", 1), ("tiny", 2), ("efficientnet_lite0", 2)])
def test_cached_activations_are_the_bottoms_output_in_float16(arch, n, engine, tmp_path):
    if engine == "onnx":
        pytest.importorskip("onnxruntime")
    data = make_dataset(tmp_path / "d", TWELVE[:2], per_split={"train": 1, "valid": 1}, size=(300, 260))
    backbone = build_backbone(arch)
    part = frozen_part(backbone, n)
    run = features.load_feature_data(data, part, augmented_views=1, cache_dir=tmp_path / "c", engine=engine, **QUIET)
    assert run.stats.engine == engine and run.stats.computed == 6  # 4 centre crops, 2 augmented
    train, valid = (FlowerFolder(data / s).samples for s in ("train", "valid"))
    bottom, top = split_backbone(backbone, n)
    digest = lambda samples: [features.file_digest(p) for p, _ in samples]  # noqa: E731
    expected_train = torch.cat([
        _expected_rows(bottom, [p for p, _ in train], features.centre_view(part), digest(train)),
        _expected_rows(bottom, [p for p, _ in train], features.augmented_view(part, 1), digest(train))])
    expected_valid = _expected_rows(bottom, [p for p, _ in valid], features.centre_view(part), digest(valid))
    for got, want in ((run.train.features, expected_train), (run.valid.features, expected_valid)):
        assert got.dtype == torch.float16 and got.shape == want.shape == (len(want), part.feature_dim)
        scale = want.abs().max().item()
        assert torch.allclose(got.float(), want, atol=2e-3 * scale, rtol=2e-3), (got.float() - want).abs().max()
    # The top on the cached rows gives the whole backbone's features.
    shape = get_spec(arch).split_shapes[n]
    with torch.inference_mode():
        tuned = top(run.valid.features.float().view(-1, *shape))
        whole = backbone.module(torch.stack([PhotoList(valid, features.centre_view(part).transform)[i][0]
                                             for i in range(len(valid))]))
    assert torch.allclose(tuned, whole, atol=2e-2 * whole.abs().max().item())
    # Stored under the split's own key, read back memory-mapped and unchanged.
    store_dir = tmp_path / "c" / features.backbone_key(part)
    assert f"-below{n}-" in store_dir.name and any(store_dir.rglob("*.npy"))
    again = features.load_feature_data(data, part, augmented_views=1, cache_dir=tmp_path / "c", engine=engine,
                                       **QUIET)
    assert again.stats.cached == 6 and again.stats.computed == 0
    assert torch.equal(again.train.features, run.train.features)
    assert any(isinstance(a, np.memmap) for a in again.train.rows.arrays)
