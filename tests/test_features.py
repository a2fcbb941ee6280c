"""The feature cache: same head as the classic loop, reused across runs, invalidated by any change."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import QUIET, ROOT, class_color, make_image
from flower_classifier import feature_store, features, shards
from flower_classifier.backbones import Backbone, build_backbone
from flower_classifier.images import Preprocessing
from flower_classifier.cli import main, single_command_main
from flower_classifier.config import TrainConfig
from flower_classifier.errors import UserError
from flower_classifier.training import run_training



def _config(**changes):
    base = dict(arch="tiny", epochs=3, learning_rate=0.02, hidden_units=(32,), batch_size=4, num_workers=0)
    return TrainConfig(**{**base, **changes})


def _losses(result):
    return torch.tensor([[h["train_loss"], h["valid_loss"], h["valid_accuracy"]] for h in result.state.history])


def test_cached_path_trains_the_same_head_as_the_classic_loop(data, tiny, tmp_path, monkeypatch):
    """Without augmentation the two paths see the same inputs in the same order: identical training
    (up to float rounding) once the store keeps float32."""
    monkeypatch.setattr(shards, "STORE_DTYPE", np.float32)
    runs = {}
    for cached in (True, False):
        runs[cached] = run_training(_config(feature_cache=cached, augment=False), data, save_dir=tmp_path / str(cached),
                                    backbone=tiny, cache_dir=tmp_path / "cache", **QUIET)
    assert torch.allclose(_losses(runs[True]), _losses(runs[False]), atol=1e-5)


def test_second_run_reads_everything_from_the_cache(data, tiny, tmp_path):
    first = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    second = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    assert (first.stats.computed, first.stats.cached) == (24, 0)
    assert (second.stats.computed, second.stats.cached) == (0, 24)
    assert torch.equal(first.train.features, second.train.features)
    assert torch.equal(first.valid.labels, second.valid.labels)
    (store,) = (tmp_path / "c").iterdir()
    (view_dir,) = store.glob("centre-*")
    (shard,) = view_dir.glob("*.npy")
    saved = np.load(shard)
    assert saved.dtype == np.float16 and saved.shape == (24, tiny.feature_dim)


def test_cold_and_warm_cache_train_identically(data, tiny, tmp_path):
    a = run_training(_config(), data, save_dir=tmp_path / "a", backbone=tiny, cache_dir=tmp_path / "c", **QUIET)
    b = run_training(_config(), data, save_dir=tmp_path / "b", backbone=tiny, cache_dir=tmp_path / "c", **QUIET)
    assert torch.equal(_losses(a), _losses(b))


def test_edited_photo_and_other_preprocessing_miss_the_cache(data, tiny, tmp_path):
    features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    photo = sorted((data / "train" / "1").iterdir())[0]
    make_image(photo, class_color(3, 4), seed=5)  # same name, new content
    again = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    assert (again.stats.computed, again.stats.cached) == (1, 23)
    resized = Backbone(tiny.name, tiny.module, tiny.feature_dim, Preprocessing(28, 32))
    other = features.load_feature_data(data, resized, cache_dir=tmp_path / "c", **QUIET)
    assert other.stats.computed == 24
    assert feature_store.backbone_key(resized) != feature_store.backbone_key(tiny)
    assert feature_store.backbone_key(build_backbone("tiny", pretrained=False)) == feature_store.backbone_key(tiny)


def test_other_weights_miss_the_cache(tiny):
    changed = build_backbone("tiny")
    with torch.no_grad():
        next(changed.module.parameters())[0, 0, 0, 0] += 1e-3
    assert feature_store.backbone_key(changed) != feature_store.backbone_key(tiny)


def test_augmented_views_are_cached_once_and_fixed_per_image(data, tiny, tmp_path):
    rng_before = torch.get_rng_state()
    first = features.load_feature_data(data, tiny, augmented_views=2, cache_dir=tmp_path / "c", **QUIET)
    assert torch.equal(torch.get_rng_state(), rng_before)  # extraction leaves the training RNG alone
    assert len(first.train) == 3 * 16 and len(first.valid) == 8
    centre, aug1, aug2 = first.train.features.split(16)
    assert not torch.allclose(centre, aug1) and not torch.allclose(aug1, aug2)
    assert torch.equal(first.train.labels[:16], first.train.labels[16:32])
    # Recomputed from scratch (no disk), view i of an image is the same picture again.
    fresh = features.load_feature_data(data, tiny, augmented_views=2, use_disk=False, **QUIET)
    assert torch.equal(fresh.train.features, first.train.features)
    more = features.load_feature_data(data, tiny, augmented_views=3, cache_dir=tmp_path / "c", **QUIET)
    assert more.stats.computed == 16  # only the third view is new


def test_no_augment_means_no_augmented_views(data, tiny, tmp_path):
    messages = []
    loader, _, _, _ = features.cached_training_data(_config(augment=False, augmented_views=2), data, tiny,
                                                 cache_dir=tmp_path / "c", progress=False, log=messages.append)
    assert len(loader.dataset) == 16 and any("ignoring --augmented_views 2" in m for m in messages)


def test_unreadable_photo_is_skipped_and_not_cached(data, tiny, tmp_path):
    (data / "train" / "2" / "broken.jpg").write_text("not a photo")
    first = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    assert len(first.train) == 16
    again = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    # Tried again and skipped again; not counted as computed, since it gave no features.
    assert (first.stats.computed, first.stats.cached) == (24, 0)
    assert (again.stats.computed, again.stats.cached) == (0, 24)


def test_resume_on_the_cached_path_continues_as_if_never_stopped(data, tiny, tmp_path):
    whole = run_training(_config(epochs=3), data, save_dir=tmp_path / "whole", backbone=tiny,
                         cache_dir=tmp_path / "c", **QUIET)
    run_training(_config(epochs=2), data, save_dir=tmp_path / "split", backbone=tiny, cache_dir=tmp_path / "c", **QUIET)
    resumed = run_training(_config(epochs=3), data, save_dir=tmp_path / "split", backbone=tiny,
                           cache_dir=tmp_path / "c", resume=tmp_path / "split", **QUIET)
    assert torch.equal(_losses(whole), _losses(resumed))


def test_bad_cache_dir_is_a_user_error(data, tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--cache_dir"):
        features.load_feature_data(data, tiny, cache_dir=blocker, **QUIET)
    assert main(["train", str(data), "--arch", "tiny", "--workers", "0", "--quiet", "--cache_dir", str(blocker),
                 "--save_dir", str(tmp_path / "ck")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--cache_dir" in err[0] and "a_file" in err[0]


def test_train_defaults_to_the_cache_and_classic_is_a_flag(data, tmp_path, capsys):
    common = [str(data), "--arch", "tiny", "--workers", "0", "--quiet", "--epochs", "1", "--cache_dir", str(tmp_path / "c")]
    out = {}
    for name, extra in (("cached", []), ("again", []), ("classic", ["--classic"])):
        assert single_command_main("train", "train.py", common + ["--save_dir", str(tmp_path / name)] + extra) == 0
        out[name] = capsys.readouterr().out
    assert re.search(r"Features: 24 computed .* 0 from the cache", out["cached"])
    assert re.search(r"Features: 0 computed .* 24 from the cache", out["again"])
    assert "cached features" in out["cached"] and "classic loop" in out["classic"] and "Features" not in out["classic"]


def test_benchmark_script_runs_end_to_end(data):
    """A smoke run of bench/bench_training.py on tiny data (timings are not asserted)."""
    run = subprocess.run([sys.executable, "bench/bench_training.py", str(data), "--arch", "tiny", "--epochs", "1",
                          "--views", "1", "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ("floor", "classic loop", "cold cache", "warm cache", "1 augmented views", "x faster"):
        assert row in run.stdout
