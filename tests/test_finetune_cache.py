"""Fine-tuning's cache: the activations below the split are cached like the features (same views,
shards, float16, engines), keyed apart per split, and the frozen default's cache is untouched."""
import shutil

import numpy as np
import pytest
import torch

from conftest import QUIET, TWELVE, make_dataset
from flower_classifier import feature_store, features, frozen_pass
from flower_classifier.backbones import build_backbone, frozen_part, get_spec, split_backbone
from flower_classifier.data import FlowerFolder, PhotoList
from flower_classifier.errors import UserError

# The keys the frozen backbones' caches had before splits existed: a cache made then is still read.
KEYS_BEFORE_SPLITS = {"tiny": "tiny-30dfc82633c46a9b", "efficientnet_lite0": "efficientnet_lite0-8e521591ab7b3e84"}


@pytest.mark.parametrize("arch", list(KEYS_BEFORE_SPLITS))
def test_the_frozen_default_keeps_its_backbone_and_cache_key(arch):
    backbone = build_backbone(arch)
    assert frozen_part(backbone, 0) is backbone
    assert feature_store.backbone_key(backbone) == KEYS_BEFORE_SPLITS[arch]
    keys = {feature_store.backbone_key(frozen_part(backbone, n)) for n in (0, 1, 2)}
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
    with pytest.raises(ValueError, match="tiny below its top 2 blocks is already a part"):
        split_backbone(part, 1)
    with pytest.raises(Exception, match="--finetune 3.*2 blocks"):
        frozen_part(backbone, 3)


def test_training_s_split_builds_the_block_stack_once_and_matches_both_halves(monkeypatch):
    from flower_classifier import backbones

    calls = []
    real = backbones._stack_to_split
    monkeypatch.setattr(backbones, "_stack_to_split", lambda *a: calls.append(a) or real(*a))
    backbone = build_backbone("tiny")
    frozen, top = backbones.split_for_training(backbone, 1)
    assert len(calls) == 1  # one stack, both parts drawn from it
    assert frozen.split == 1 and all(p.requires_grad for p in top.parameters())
    assert not any(p.requires_grad for p in frozen.module.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the parts are the backbone's own modules: top(frozen(x)) is the backbone's output
        shape = get_spec("tiny").split_shapes[1]
        assert torch.allclose(top(frozen.module(x).view(-1, *shape)), backbone.module(x), atol=1e-6)
    assert backbones.split_for_training(backbone, 0)[0] is backbone


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
    digest = lambda samples: [feature_store.file_digest(p) for p, _ in samples]  # noqa: E731
    expected_train = torch.cat([
        _expected_rows(bottom, [p for p, _ in train], frozen_pass.centre_view(part), digest(train)),
        _expected_rows(bottom, [p for p, _ in train], frozen_pass.augmented_view(part, 1), digest(train))])
    expected_valid = _expected_rows(bottom, [p for p, _ in valid], frozen_pass.centre_view(part), digest(valid))
    for got, want in ((run.train.features, expected_train), (run.valid.features, expected_valid)):
        assert got.dtype == torch.float16 and got.shape == want.shape == (len(want), part.feature_dim)
        scale = want.abs().max().item()
        assert torch.allclose(got.float(), want, atol=2e-3 * scale, rtol=2e-3), (got.float() - want).abs().max()
    # The top on the cached rows gives the whole backbone's features.
    shape = get_spec(arch).split_shapes[n]
    with torch.inference_mode():
        tuned = top(run.valid.features.float().view(-1, *shape))
        whole = backbone.module(torch.stack([PhotoList(valid, frozen_pass.centre_view(part).transform)[i][0]
                                             for i in range(len(valid))]))
    assert torch.allclose(tuned, whole, atol=2e-2 * whole.abs().max().item())
    # Stored under the split's own key, read back memory-mapped and unchanged.
    store_dir = tmp_path / "c" / feature_store.backbone_key(part)
    assert f"-below{n}-" in store_dir.name and any(store_dir.rglob("*.npy"))
    again = features.load_feature_data(data, part, augmented_views=1, cache_dir=tmp_path / "c", engine=engine,
                                       **QUIET)
    assert again.stats.cached == 6 and again.stats.computed == 0
    assert torch.equal(again.train.features, run.train.features)
    assert any(isinstance(a, np.memmap) for a in again.train.rows.arrays)


def _disk_with(free: int):
    return lambda path: shutil._ntuple_diskusage(10 * free + 1, 9 * free, free)


def test_the_size_is_said_before_the_pass_and_a_disk_without_room_refuses_it(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", TWELVE[:2], per_split={"train": 2, "valid": 1})
    part = frozen_part(build_backbone("tiny"), 1)  # 8x16x16 = 2,048 numbers per view
    needed = (4 + 2 + 4) * 2048 * 2  # centre crops of 4 training + 2 validation photos, 1 augmented view of 4
    said = []
    load = lambda: features.load_feature_data(data, part, augmented_views=1, cache_dir=tmp_path / "c",  # noqa: E731
                                              engine="torch", log=said.append, progress=False)
    monkeypatch.setattr(feature_store.shutil, "disk_usage", _disk_with(needed - 1))
    with pytest.raises(UserError) as refused:
        load()
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "c") in message and f"takes {needed / 1e3:.1f} kB" in message
    assert all(word in message for word in ("--cache_dir", "--augmented_views", "--finetune")), message
    assert not list((tmp_path / "c").rglob("*.npy"))  # refused before computing anything
    monkeypatch.setattr(feature_store.shutil, "disk_usage", _disk_with(needed))
    run = load()
    assert run.stats.computed == 10
    assert said[0] == (f"caching tiny activations below the top 1 blocks: 8x16x16 = 2,048 numbers per view, "
                       f"10 views, {needed / 1e3:.1f} kB in {tmp_path / 'c' / feature_store.backbone_key(part)}")
    assert said[-1].startswith("Activations below the top 1 blocks: 10 computed")
    # Nothing left to compute: nothing to say, and no room needed.
    said.clear()
    monkeypatch.setattr(feature_store.shutil, "disk_usage", _disk_with(0))
    assert load().stats.cached == 10 and not any(line.startswith("caching") for line in said)


def test_the_frozen_default_says_nothing_of_small_features_but_still_checks_the_disk(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", TWELVE[:2], per_split={"train": 2, "valid": 1})
    said = []
    monkeypatch.setattr(feature_store.shutil, "disk_usage", _disk_with(6 * 16 * 2))
    features.load_feature_data(data, build_backbone("tiny"), cache_dir=tmp_path / "c", engine="torch",
                               log=said.append, progress=False)
    assert len(said) == 1 and said[0].startswith("Features: 6 computed")
    monkeypatch.setattr(feature_store.shutil, "disk_usage", _disk_with(4 * 16 * 2 - 1))
    with pytest.raises(UserError, match=r"caching tiny features: 16 numbers per view, 10 views \(4 to compute\) "
                                        r"takes 0.1 kB and its disk has 0.1 kB free; .*--augmented_views\)$"):
        features.load_feature_data(data, build_backbone("tiny"), augmented_views=1, cache_dir=tmp_path / "c",
                                   engine="torch", log=said.append, progress=False)


@pytest.mark.parametrize("arch", ["tiny", "efficientnet_lite0", "resnet50"])
def test_backbones_says_what_the_fine_tuned_top_adds_to_a_checkpoint(arch):
    from flower_classifier.backbones import describe

    spec = get_spec(arch)
    backbone = build_backbone(arch, pretrained=False)
    for n in (1, 2):
        top = split_backbone(backbone, n)[1]
        stored = sum(t.numel() * t.element_size() for t in top.state_dict().values())
        assert spec.top_bytes(n) == stored > sum(p.numel() for p in top.parameters()) * 4 - 1
        assert f"{stored / 1e6:.3g} MB in the checkpoint" in describe(spec).splitlines()[1]
    with pytest.raises(ValueError):
        spec.top_layout(spec.num_blocks + 1)
