"""--class_weights balanced: loss weights from the training split's counts, on both paths and under
resume; a minority category found more often than without them; the option kept with the run."""
import json

import numpy as np
import pytest
import torch

from conftest import make_image
from flower_classifier import training
from flower_classifier.backbones import build_backbone
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig, load_defaults
from flower_classifier.errors import UserError
from flower_classifier.evaluation import evaluate_checkpoint, report_checkpoint
from flower_classifier.training import loss_weights, run_training

QUIET = dict(progress=False, log=lambda message: None)
COUNTS = {"a": 6, "b": 3, "c": 1}  # training photos per category: 10 in all
# n / (C * n_c): 10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)
BALANCED = [10 / 18, 10 / 9, 10 / 3]


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny")


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """Three well-separated colours, 6 / 3 / 1 training photos, 2 validation photos each."""
    root = tmp_path_factory.mktemp("imbalanced") / "d"
    colours = {"a": (200, 60, 60), "b": (60, 200, 60), "c": (60, 60, 200)}
    for i, (category, n) in enumerate(COUNTS.items()):
        for j, (split, count) in enumerate((("train", n), ("valid", 2))):
            for k in range(count):
                make_image(root / split / category / f"{k}.jpg", colours[category], seed=100 * i + 10 * j + k)
    return root


def _config(**changes):
    base = dict(arch="tiny", epochs=3, learning_rate=0.02, hidden_units=(16,), batch_size=4, num_workers=0,
                class_weights="balanced")
    return TrainConfig(**{**base, **changes})


def test_balanced_weights_for_known_counts():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    assert loss_weights(_config(), labels, 3).tolist() == pytest.approx(BALANCED)
    assert loss_weights(_config(class_weights="none"), labels, 3) is None
    # Each class's images then weigh the same in all: n_c * w_c = n / C.
    assert (torch.bincount(labels) * loss_weights(_config(), labels, 3)).tolist() == pytest.approx([10 / 3] * 3)


@pytest.mark.parametrize("changes", [dict(feature_cache=True), dict(feature_cache=True, augmented_views=2),
                                     dict(feature_cache=False)], ids=["cached", "cached-2-views", "classic"])
def test_both_paths_weigh_the_loss_by_the_training_split(changes, imbalanced, tiny, tmp_path, monkeypatch):
    """What reaches the loop is the split's counts' weights, whichever path (augmented views count
    every image the same number of times, so they change nothing)."""
    seen = []

    def spy(*args, class_weights=None, **kw):
        seen.append(class_weights)
        return real_fit(*args, class_weights=class_weights, **kw)

    real_fit = training.fit
    monkeypatch.setattr(training, "fit", spy)
    run_training(_config(epochs=1, **changes), imbalanced, save_dir=tmp_path / "run", backbone=tiny,
                 cache_dir=tmp_path / "c", **QUIET)
    (weights,) = seen
    assert weights.tolist() == pytest.approx(BALANCED)


def test_weights_change_the_training_loss_but_not_the_validation_loss(imbalanced, tiny, tmp_path):
    """Epoch 1 starts from the same head: the training losses differ (weighted), the validation loss
    after it is the plain one, so the two runs' validation losses measure the same thing."""
    runs = {cw: run_training(_config(epochs=1, class_weights=cw), imbalanced, save_dir=tmp_path / cw, backbone=tiny,
                             cache_dir=tmp_path / "c", **QUIET).state.history[0] for cw in ("none", "balanced")}
    assert runs["none"]["train_loss"] != pytest.approx(runs["balanced"]["train_loss"])
    head = load_checkpoint(tmp_path / "balanced" / "last.pth")
    assert head.config.class_weights == "balanced"  # kept in the checkpoint's config
    # The balanced run's recorded validation loss is the plain (unweighted) loss of its head.
    plain = evaluate_checkpoint(tmp_path / "balanced" / "last.pth", imbalanced / "valid", progress=False)
    assert plain["loss"] == pytest.approx(runs["balanced"]["valid_loss"], rel=1e-3)  # the cache keeps float16


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "classic"])
def test_a_resumed_balanced_run_ends_as_the_uninterrupted_one(cached, imbalanced, tiny, tmp_path):
    whole = run_training(_config(feature_cache=cached), imbalanced, save_dir=tmp_path / "whole", backbone=tiny,
                         cache_dir=tmp_path / "c", **QUIET)
    run_training(_config(feature_cache=cached, epochs=2), imbalanced, save_dir=tmp_path / "split", backbone=tiny,
                 cache_dir=tmp_path / "c", **QUIET)
    resumed = run_training(_config(feature_cache=cached), imbalanced, save_dir=tmp_path / "split", backbone=tiny,
                           cache_dir=tmp_path / "c", resume=True, **QUIET)
    drop_time = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert drop_time(whole.state.history) == drop_time(resumed.state.history)
    got, ref = load_checkpoint(resumed.last_path), load_checkpoint(whole.last_path)
    assert all(torch.equal(got.head_state[k], v) for k, v in ref.head_state.items())
    with pytest.raises(UserError, match="class_weights 'none' \\(saved run: 'balanced'\\)"):
        run_training(_config(feature_cache=cached, epochs=4, class_weights="none"), imbalanced,
                     save_dir=tmp_path / "split", backbone=tiny, cache_dir=tmp_path / "c", resume=True, **QUIET)


def _two_reds(root, rng, gap=60, spread=12):
    """A common and a rare category of two reds: red channel around 140 and 140 + `gap` (sd `spread`,
    drawn per photo). 20 vs 2 training photos; 20 of each to test on."""
    for split, counts in (("train", (20, 2)), ("valid", (4, 4)), ("test", (20, 20))):
        for category, n, red in (("common", counts[0], 140), ("rare", counts[1], 140 + gap)):
            for k in range(n):
                colour = (int(red + rng.normal(0, spread)), 110, 100)
                make_image(root / split / category / f"{k}.jpg", colour, seed=int(rng.integers(2**31)))
    return root


def test_balanced_weights_raise_the_rare_categorys_recall(tiny, tmp_path):
    """Unweighted, the head learns first that `rare` almost never happens and, 15 epochs in, still calls
    (nearly) every test photo `common`; weighted, both categories pull equally and it has found the
    colour. (On 4 generated sets x 2 seeds: rare recall 0 in 7 of 8 unweighted runs, 0.85 in one;
    0.95-1.0 in all weighted ones.)"""
    data = _two_reds(tmp_path / "d", np.random.default_rng(0))
    recall, macro_f1 = {}, {}
    for cw in ("none", "balanced"):
        for seed in (0, 1):
            result = run_training(_config(class_weights=cw, seed=seed, epochs=15, learning_rate=0.05, batch_size=8,
                                          augment=False), data, save_dir=tmp_path / f"{cw}{seed}", backbone=tiny,
                                  cache_dir=tmp_path / "c", **QUIET)
            report = report_checkpoint(result.last_path, data / "test")
            rare = next(r for r in report.per_class() if r["category"] == "rare")
            recall[cw, seed], macro_f1[cw, seed] = rare["recall"], report.macro_f1
    for seed in (0, 1):
        assert recall["balanced", seed] >= recall["none", seed] + 0.5, recall
        assert macro_f1["balanced", seed] > macro_f1["none", seed], macro_f1


def test_the_option_is_checked_everywhere_and_kept_with_the_run(imbalanced, tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError, match="class_weights must be one of none, balanced \\(got 'weighted'\\)"):
        TrainConfig(class_weights="weighted")
    assert TrainConfig.from_dict({"arch": "tiny"}).class_weights == "none"  # a config saved before the option
    for text, message in [('{"class_weights": "inverse"}', "class_weights must be one of none, balanced"),
                          ('{"class_weights": 1}', "class_weights must be a string")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(UserError, match=message):
            load_defaults(tmp_path / "bad.json")
    with pytest.raises(SystemExit) as refused:  # argparse refuses from inside parse_args
        main(["train", str(imbalanced), "--class-weights", "weighted"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and "--class_weights" in err[0], err
    # hyperparameters.json's value becomes train's default and lands in the checkpoint's config.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hyperparameters.json").write_text(json.dumps({"hyperparameters": {"class_weights": "balanced"}}))
    assert load_defaults() == {"class_weights": "balanced"}
    assert main(["train", str(imbalanced), "--arch", "tiny", "--epochs", "1", "--hidden_units", "8", "--workers", "0",
                 "--save_dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pth").config.class_weights == "balanced"
    assert main(["train", str(imbalanced), "--arch", "tiny", "--epochs", "1", "--hidden_units", "8", "--workers", "0",
                 "--save_dir", str(tmp_path / "run2"), "--quiet", "--class_weights", "none"]) == 0
    assert load_checkpoint(tmp_path / "run2" / "last.pth").config.class_weights == "none"
