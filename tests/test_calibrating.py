"""Calibration's decisions, fast: which way the threshold and the temperature go, which epochs the fold
heads train and through which loop; and a run stopped during calibration or its record is finished by
--resume."""
import numpy as np
import pytest
import torch

from conftest import make_dataset
from flower_classifier import calibrating, fitting, near_far, training
from flower_classifier.calibration import Calibration, fit_temperature
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.config import TrainConfig
from flower_classifier.errors import Interrupted, UserError
from flower_classifier.model import StackedHeads, build_head
from flower_classifier.unknown import choose_threshold, softmax


def test_a_higher_score_means_unknown_and_the_threshold_keeps_the_chosen_share():
    scores = np.random.default_rng(0).uniform(size=400)
    threshold, _ = choose_threshold(scores, keep=0.9)
    assert (scores <= threshold).mean() == pytest.approx(0.9, abs=1 / 400)
    calibration = Calibration(method="max_logit", threshold=threshold)
    logits = -scores[:, None] * np.ones((1, 3))  # max_logit score = -max(logits) = the score itself
    unknown = calibration.assess(logits).unknown
    assert unknown.mean() == pytest.approx(0.1, abs=1 / 400)
    assert scores[unknown].min() > scores[~unknown].max()  # the highest scores, and only they, are unknown


def test_overconfident_logits_get_a_temperature_above_one_underconfident_below():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 2000)
    calibrated = rng.normal(size=(2000, 4))
    calibrated[np.arange(2000), labels] += 1.5  # right about as often as softmax(calibrated) says
    sampled = np.array([rng.choice(4, p=p) for p in softmax(calibrated)])  # labels drawn from those probabilities
    assert fit_temperature(3 * calibrated, sampled) > 2  # logits 3x too large: T ~ 3 undoes it
    assert fit_temperature(calibrated / 3, sampled) < 0.5
    assert fit_temperature(calibrated, sampled) == pytest.approx(1, abs=0.15)


def test_stacked_heads_are_the_heads_side_by_side():
    heads = [build_head(10, [7], 3, 0.0) for _ in range(4)]
    x = torch.randn(6, 10)
    out = StackedHeads(heads).eval()(x)  # (N, C, K)
    for k, head in enumerate(heads):
        torch.testing.assert_close(out[:, :, k], head.eval()(x))


def test_fold_heads_train_through_the_one_loop_for_the_best_epochs_count(monkeypatch):
    seen = []

    def spy(model, loader, *args, **kwargs):
        seen.append((model, kwargs.get("scheduler")))
        return fitting.train_one_epoch(model, loader, *args, **kwargs)

    assert calibrating.train_one_epoch is fitting.train_one_epoch  # the head's own loop, not a copy
    monkeypatch.setattr(calibrating, "train_one_epoch", spy)
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 10)
    data = calibrating.CalibrationData((rng.normal(size=(20, 8)).astype(np.float32), labels[:20]),
                                       (rng.normal(size=(10, 8)).astype(np.float32), labels[20:]))
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=7, schedule="cosine", num_workers=0)
    head = build_head(8, [8], 3, 0.0).state_dict()
    calibrating.calibrate_head(head, config, ["a", "b", "c"], data, method="msp", keep=0.95, epochs=3)
    assert len(seen) == 3  # the best epoch's 3, not config.epochs' 7
    assert all(isinstance(model, StackedHeads) and scheduler is not None for model, scheduler in seen)
    # The schedule is the head's: over config.epochs, so after 3 of 7 epochs the rate has not reached its end.
    lr = seen[-1][1].get_last_lr()[0]
    assert 0 < lr < config.learning_rate


def _clustered(per_class: dict[str, int], dim: int = 8, seed: int = 3):
    """{split: photos per class} -> (features (N, dim), labels (N,)) of 3 separated clusters, per split."""
    rng = np.random.default_rng(seed)
    centres = 4 * np.eye(3, dim)
    out = {}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(3), n)
        out[split] = ((centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels)
    return out


@pytest.mark.parametrize("method", ["mahalanobis", "mahalanobis_species", "msp", "near_far"])
def test_a_large_valid_split_calibrates_alone_and_its_threshold_keeps_the_chosen_share(monkeypatch, method):
    trained = []
    monkeypatch.setattr(calibrating, "train_one_epoch", lambda *a, **k: trained.append(1))
    per = calibrating.VALID_ONLY_PER_CLASS
    splits = _clustered({"train": 2 * per, "valid": per})
    data = calibrating.CalibrationData(splits["train"], splits["valid"])
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=4, num_workers=0)
    head = build_head(8, [8], 3, 0.0).state_dict()
    calibration = calibrating.calibrate_head(head, config, ["a", "b", "c"], data, method=method, keep=0.9, epochs=4)
    assert trained == []  # no fold heads
    valid_logits = calibrating.head_logits(head, (8,), 3, splits["valid"][0])
    kept = (calibration.scores(valid_logits, splits["valid"][0]) <= calibration.threshold).mean()
    if method == "near_far":  # kept counted on the cross-fitted distances; scored again by the fit on all, more
        assert calibration.kept == pytest.approx(0.9, abs=1 / (3 * per)) and kept >= calibration.kept
    else:
        assert kept == pytest.approx(0.9, abs=1 / (3 * per)) and calibration.kept == pytest.approx(kept)
    assert calibration.temperature == pytest.approx(fit_temperature(valid_logits, splits["valid"][1]))
    if method.startswith("mahalanobis"):  # class means from the train photos alone: the valid ones score as unseen
        norm = splits["train"][0] / np.linalg.norm(splits["train"][0], axis=1, keepdims=True)
        means = np.stack([norm[splits["train"][1] == c].mean(0) for c in range(3)])
        np.testing.assert_allclose(calibration.arrays["means"], means, atol=2e-3)  # stored as float16
    line = calibrating.calibrated_line(calibration, data, ["a", "b", "c"])
    assert f"{3 * per} valid photos" in line and "cross-fitted in" not in line
    assert ("Mahalanobis distances of all" in line) == (method == "near_far")


def test_the_runs_seed_deals_the_far_parts_folds_on_a_large_valid_split():
    """near_far's far cut cross-fits train+valid in folds dealt by the run's --seed, as the
    cross-fitted rule's folds are: another seed, another dealing, another cut."""
    per = calibrating.VALID_ONLY_PER_CLASS
    splits = _clustered({"train": 3 * per, "valid": per})
    data = calibrating.CalibrationData(splits["train"], splits["valid"])
    head = build_head(8, [8], 3, 0.0).state_dict()
    valid_logits = calibrating.head_logits(head, (8,), 3, splits["valid"][0])
    cuts = {}
    for seed in (0, 5):
        config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=2, num_workers=0, seed=seed)
        calibration = calibrating.calibrate_head(head, config, ["a", "b", "c"], data, method="near_far", keep=0.9)
        arrays, _ = near_far.fit_near_far_valid(valid_logits, splits["train"], splits["valid"],
                                                calibration.temperature, keep=0.9, seed=seed)
        assert calibration.arrays["far_cut"] == arrays["far_cut"]
        cuts[seed] = float(arrays["far_cut"])
    assert cuts[0] != cuts[5]


@pytest.mark.parametrize("method", ["mahalanobis", "near_far"])
def test_a_small_valid_split_calibrates_cross_fitted(monkeypatch, method):
    trained = []

    def spy(*args, **kwargs):
        trained.append(1)
        return fitting.train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(calibrating, "train_one_epoch", spy)
    splits = _clustered({"train": 12, "valid": calibrating.VALID_ONLY_PER_CLASS - 1})
    data = calibrating.CalibrationData(splits["train"], splits["valid"])
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=2, num_workers=0)
    head = build_head(8, [8], 3, 0.0).state_dict()
    calibration = calibrating.calibrate_head(head, config, ["a", "b", "c"], data, method=method, keep=0.95, epochs=2)
    assert len(trained) == 2  # the fold heads, for the best epoch's count
    assert "cross-fitted in 5 folds" in calibrating.calibrated_line(calibration, data, ["a", "b", "c"])


def test_a_fine_tuned_head_calibrates_on_the_valid_split_alone_whatever_its_size(monkeypatch):
    """Fold heads over a fine-tuned checkpoint's features would score photos its blocks trained on:
    the valid photos, which nothing was trained on, calibrate it instead, however few."""
    trained = []
    monkeypatch.setattr(calibrating, "train_one_epoch", lambda *a, **k: trained.append(1))
    splits = _clustered({"train": 12, "valid": 2})  # far below VALID_ONLY_PER_CLASS
    data = calibrating.CalibrationData(splits["train"], splits["valid"])
    head = build_head(8, [8], 3, 0.0).state_dict()
    tuned = TrainConfig(arch="tiny", hidden_units=(8,), epochs=2, num_workers=0, finetune=1)
    assert calibrating.valid_only(data, 3, finetune=1)
    assert not calibrating.valid_only(data, 3, finetune=0)
    training.check_finetune(tuned.replace(unknown_score="near_far"))  # every score can calibrate the blocks
    valid_logits = calibrating.head_logits(head, (8,), 3, splits["valid"][0])
    for method in ("mahalanobis", "near_far"):
        calibration = calibrating.calibrate_head(head, tuned, ["a", "b", "c"], data, method=method, keep=0.9)
        assert trained == []  # no fold heads
        assert calibration.temperature == pytest.approx(fit_temperature(valid_logits, splits["valid"][1]))
        kept = (calibration.scores(valid_logits, splits["valid"][0]) <= calibration.threshold).mean()
        assert kept == calibration.kept if method == "mahalanobis" else kept >= calibration.kept  # near_far: as above
        assert "6 valid photos" in calibrating.calibrated_line(calibration, data, ["a", "b", "c"], finetune=1)


@pytest.mark.parametrize("valid", [2, calibrating.VALID_ONLY_PER_CLASS])
def test_the_feature_fits_run_on_one_blas_thread(monkeypatch, valid):
    """BLAS threads spinning against torch's made the Mahalanobis fits 10-50x slower under load."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []

    def spy(real):
        def fit(*args, **kwargs):
            seen.append({i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"})
            return real(*args, **kwargs)
        return fit

    monkeypatch.setattr(calibrating, "valid_calibration", spy(calibrating.valid_calibration))
    monkeypatch.setattr(calibrating, "fit_calibration", spy(calibrating.fit_calibration))
    splits = _clustered({"train": 12, "valid": valid})
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=1, num_workers=0)
    calibrating.calibrate_head(build_head(8, [8], 3, 0.0).state_dict(), config, ["a", "b", "c"],
                               calibrating.CalibrationData(splits["train"], splits["valid"]), method="mahalanobis",
                               keep=0.95)
    assert seen == [{1}]


def test_fold_rows_leave_each_photo_and_its_views_out_of_its_own_folds_head():
    features = np.arange(5, dtype=np.float32)[:, None]  # photo i's feature is i
    labels, fold = np.array([0, 1, 0, 1, 2]), np.array([0, 1, 2, 0, 1])
    views = np.concatenate([features[:3] + 10, features[:3] + 20])  # two views of the first 3 photos
    rows, targets = calibrating.fold_rows(features, labels, fold, views, viewed=3)
    photo = (rows[:, 0] % 10).astype(int)
    assert len(rows) == 11 and targets.shape == (11, 3)
    assert (targets[np.arange(11), fold[photo]] == -100).all()
    assert (np.sort(targets, 1)[:, 1:] == labels[photo][:, None]).all()  # every other head sees its label


# ---------------------------------------------------------------- a run is done when calibrated and recorded

@pytest.fixture
def small(tmp_path):
    return make_dataset(tmp_path / "d", ["a", "b", "c"], per_split={"train": 4, "valid": 2})


CONFIG = TrainConfig(arch="tiny", hidden_units=(8,), epochs=2, num_workers=0)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("stage", ["calibration", "record"])
def test_a_run_stopped_after_training_is_finished_by_resume(small, tmp_path, monkeypatch, stage):
    from flower_classifier import record

    target = (calibrating, "calibrate_checkpoint") if stage == "calibration" else (record, "write_record")
    with monkeypatch.context() as patch:
        patch.setattr(*target, interrupt)
        lines = []
        with pytest.raises(Interrupted):
            training.run_training(CONFIG, small, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c",
                                  log=lines.append, progress=False)
    assert "finish it with the same command plus --resume" in lines[-1]
    assert not (tmp_path / "ck" / "MODEL_CARD.md").exists()
    calibrations = []
    real = calibrating.calibrate_checkpoint
    monkeypatch.setattr(calibrating, "calibrate_checkpoint", lambda *a, **k: calibrations.append(1) or real(*a, **k))
    lines = []
    result = training.run_training(CONFIG, small, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", resume=True,
                                   log=lines.append, progress=False)
    assert result.epochs_run == 0 and not any("nothing to train" in line for line in lines)
    assert any("finishing it" in line for line in lines)
    assert load_checkpoint(result.best_path).calibration is not None
    assert (tmp_path / "ck" / "MODEL_CARD.md").exists() and (tmp_path / "ck" / "history.csv").exists()
    assert len(calibrations) == (1 if stage == "calibration" else 0)  # a calibrated best is not redone
    # Now it is done: a third call has nothing left.
    lines = []
    training.run_training(CONFIG, small, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", resume=True,
                          log=lines.append, progress=False)
    assert any("nothing to train" in line for line in lines)
