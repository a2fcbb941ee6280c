"""--finetune N: the top N blocks of the backbone train with the head, on cached activations (or on
images with --classic); the rest stays as pretrained. Tiny backbone (2 blocks), generated photos."""
import numpy as np
import pytest
import torch

from conftest import QUIET, TWELVE, make_dataset
from flower_classifier import fitting, training
from flower_classifier.backbones import build_backbone, split_backbone
from flower_classifier.checkpoint import build_model, load_checkpoint
from flower_classifier.cli import main, single_command_main
from flower_classifier.config import TrainConfig
from flower_classifier.errors import Interrupted
from flower_classifier.runfolder import RunFolder

FAST = dict(arch="tiny", hidden_units=(16,), batch_size=4, num_workers=0, learning_rate=0.01)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("finetune") / "flowers", TWELVE[:4],
                        per_split={"train": 4, "valid": 2, "test": 2})


def train(data, save_dir, cache_dir, **options):
    config = TrainConfig(**{**FAST, "epochs": 3, **options})
    return training.run_training(config, data, save_dir=save_dir, cache_dir=cache_dir, **QUIET)


def pretrained_top(n: int) -> dict:
    return split_backbone(build_backbone("tiny"), n)[1].state_dict()


@pytest.mark.parametrize("classic", [False, True], ids=["cached", "classic"])
def test_the_top_blocks_train_and_the_blocks_below_do_not(data, tmp_path, tiny, monkeypatch, classic):
    pretrained = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    after = {}
    real_fit = training.fit

    def fit(model, *args, **kwargs):  # the weights the run's model holds once its epochs are done
        state = real_fit(model, *args, **kwargs)
        after.update({k: v.clone() for k, v in model.state_dict().items()})
        return state

    monkeypatch.setattr(training, "fit", fit)
    result = training.run_training(TrainConfig(**FAST, epochs=3, finetune=1, feature_cache=not classic), data,
                                   save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", backbone=tiny, **QUIET)
    # tiny = [conv, bn, relu] x 2 + pool: the first unit is the bottom, the second the top block.
    prefix = "backbone.layers." if classic else "top.0."
    bottom = {k: v for k, v in pretrained.items() if k.startswith(("layers.0.", "layers.1."))}
    if classic:
        assert all(torch.equal(after[f"backbone.{k}"], v) for k, v in bottom.items())  # ran, did not change
    top_weights = {k: v for k, v in after.items() if k.startswith(prefix) and k.endswith("weight")}
    assert top_weights
    ckpt = load_checkpoint(result.last_path)
    top_pretrained = pretrained_top(1)
    assert set(ckpt.top_state) == set(top_pretrained)  # the top block and the tail: nothing of the bottom
    changed = [k for k, v in top_pretrained.items() if v.is_floating_point() and not torch.equal(ckpt.top_state[k], v)]
    assert any(k.endswith("weight") for k in changed), changed
    # BatchNorm keeps its pretrained statistics: the top stays in eval mode while it trains.
    for key in (k for k in top_pretrained if "running" in k):
        assert torch.equal(ckpt.top_state[key], top_pretrained[key]), key
    # The caller's backbone is left as it was.
    assert all(torch.equal(tiny.module.state_dict()[k], v) for k, v in pretrained.items())
    assert all(not p.requires_grad for p in tiny.module.parameters())
    # The rebuilt model: the bottom as pretrained, the top as saved.
    rebuilt = build_model(ckpt, backbone=build_backbone("tiny")).backbone.state_dict()
    assert all(torch.equal(rebuilt[k], v) for k, v in bottom.items())
    assert not all(torch.equal(rebuilt[k], pretrained[k]) for k in pretrained)


def test_head_and_blocks_get_their_own_learning_rates(tiny):
    config = TrainConfig(**FAST, finetune=2, backbone_lr_factor=0.03)
    _, top = split_backbone(build_backbone("tiny"), 2)
    head = torch.nn.Linear(16, 4)
    optimizer = training.make_optimizer(head, config, top)
    head_group, block_group = optimizer.param_groups
    assert head_group["lr"] == pytest.approx(0.01) and block_group["lr"] == pytest.approx(0.01 * 0.03)
    assert {id(p) for p in block_group["params"]} == {id(p) for p in top.parameters()}
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head.parameters()}
    # The frozen backbone: one group, the head's alone, as before fine-tuning existed.
    assert len(training.make_optimizer(head, config.replace(finetune=0), torch.nn.Sequential()).param_groups) == 1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules_rise_then_fall_and_keep_the_blocks_factor(schedule):
    total = 100
    m = [fitting.lr_multiplier(schedule, step, total) for step in range(total)]
    peak = int(np.argmax(m))
    assert m[0] <= 0.2 and m[peak] == pytest.approx(1.0) and m[-1] < 0.01
    assert all(a <= b for a, b in zip(m[:peak], m[1:peak + 1])) and all(a >= b for a, b in zip(m[peak:], m[peak + 1:]))
    assert peak == (24 if schedule == "onecycle" else 4)
    assert fitting.lr_multiplier("constant", 37, total) == 1.0
    head, block = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    config = TrainConfig(**FAST, finetune=1, backbone_lr_factor=0.1, schedule=schedule, epochs=10)
    optimizer = training.make_optimizer(head, config, torch.nn.Sequential(block))
    scheduler = fitting.make_scheduler(optimizer, config, steps_per_epoch=10)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    head_lr, block_lr = (g["lr"] for g in optimizer.param_groups)
    assert head_lr == pytest.approx(0.01 * fitting.lr_multiplier(schedule, 30, 100))
    assert block_lr == pytest.approx(0.1 * head_lr)


def test_patience_stops_when_the_validation_loss_stops_improving(data, tmp_path, monkeypatch):
    losses = iter([1.0, 0.8, 0.9, 0.85, 0.7, 0.6])  # best at epoch 2, then two epochs without a lower one
    real = fitting.evaluate

    def evaluate(*args, **kwargs):
        figures = real(*args, **kwargs)
        return {**figures, "loss": next(losses)}

    monkeypatch.setattr(fitting, "evaluate", evaluate)
    said = []
    config = TrainConfig(**FAST, epochs=6, patience=2)
    result = training.run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c",
                                   log=said.append, progress=False)
    assert [h["epoch"] for h in result.state.history] == [1, 2, 3, 4]
    [stop] = [line for line in said if line.startswith("Early stop")]
    assert "2 epochs" in stop and "epoch 2" in stop and "--patience 2" in stop
    assert fitting.early_stop([{"epoch": 1, "valid_loss": 1.0}], 0) is None  # 0: off


def test_a_resumed_fine_tune_ends_as_an_uninterrupted_one(data, tmp_path, monkeypatch):
    options = dict(finetune=2, schedule="onecycle", backbone_lr_factor=0.3, epochs=3, augmented_views=1)
    whole = train(data, tmp_path / "whole", tmp_path / "c", **options)
    real_save = RunFolder.save_epoch

    def save_then_stop(self, snapshot, **kw):
        real_save(self, snapshot, **kw)
        if snapshot.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "save_epoch", save_then_stop)
    with pytest.raises(Interrupted):
        train(data, tmp_path / "parts", tmp_path / "c", **options)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "parts" / "last.pth").epoch == 1
    config = TrainConfig(**{**FAST, **options})
    resumed = training.run_training(config, data, save_dir=tmp_path / "parts", cache_dir=tmp_path / "c",
                                    resume=True, **QUIET)
    assert resumed.epochs_run == 2
    for name in ("last.pth", "checkpoint.pth"):
        a, b = load_checkpoint(tmp_path / "whole" / name), load_checkpoint(tmp_path / "parts" / name)
        assert a.epoch == b.epoch
        for saved_a, saved_b in ((a.head_state, b.head_state), (a.top_state, b.top_state)):
            assert saved_a.keys() == saved_b.keys()
            assert all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a), name
        assert [h["learning_rate"] for h in a.history] == [h["learning_rate"] for h in b.history]
        assert [h["valid_loss"] for h in a.history] == [h["valid_loss"] for h in b.history]
    assert whole.state.history[0]["learning_rate"] != whole.state.history[-1]["learning_rate"]  # it did schedule


@pytest.mark.parametrize("change", [{"finetune": 1}, {"backbone_lr_factor": 0.5}, {"schedule": "cosine"}])
def test_resume_refuses_a_changed_recipe_but_not_a_changed_patience(data, tmp_path, change):
    options = dict(finetune=2, schedule="onecycle", epochs=1)
    train(data, tmp_path / "ck", tmp_path / "c", **options)
    config = TrainConfig(**{**FAST, **options, "epochs": 2, **change})
    with pytest.raises(Exception, match="cannot resume.*" + next(iter(change))):
        training.run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", resume=True, **QUIET)
    config = TrainConfig(**{**FAST, **options, "epochs": 2, "patience": 3})
    assert training.run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", resume=True,
                                 **QUIET).epochs_run == 1


def test_finetune_0_is_the_frozen_run_it_always_was(data, tmp_path, tiny):
    result = training.run_training(TrainConfig(**FAST, epochs=2), data, save_dir=tmp_path / "ck",
                                   cache_dir=tmp_path / "c", backbone=tiny, **QUIET)
    ckpt = load_checkpoint(result.last_path)
    assert not ckpt.top_state
    state = torch.load(tmp_path / "ck" / "last.state.pth", weights_only=True)
    assert len(state["optimizer"]["param_groups"]) == 1 and "top_state" not in state and "scheduler" not in state


def test_the_record_and_calibration_use_the_best_epochs_blocks(data, tmp_path, monkeypatch):
    """The end-of-run test figures are those of checkpoint.pth's own head and blocks, and its
    calibration was fitted on the features its own blocks give (not the frozen backbone's)."""
    from flower_classifier.evaluation import evaluate_checkpoint

    config = TrainConfig(**{**FAST, "learning_rate": 0.03}, epochs=4, finetune=1, unknown_score="cosine")
    result = training.run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", test=True,
                                   **QUIET)
    figures = evaluate_checkpoint(result.best_path, data / "test", progress=False)
    assert result.evaluated.accuracy == pytest.approx(figures["accuracy"])
    card = (tmp_path / "ck" / "MODEL_CARD.md").read_text()
    assert "its top 1 blocks fine-tuned at 0.1 x the head's learning rate" in card and "--finetune 1" in card
    best = load_checkpoint(result.best_path)
    expected = centre_crop_class_directions(best, data)
    assert np.allclose(best.calibration.arrays["directions"], expected, atol=2e-2)


def centre_crop_class_directions(ckpt, data) -> np.ndarray:
    """Unit class means of the unit train + valid features (what calibration fits its arrays on),
    through the checkpoint's fine-tuned model."""
    from flower_classifier.data import load_split

    model = build_model(ckpt, backbone=build_backbone("tiny"))
    features, labels = [], []
    for split in ("train", "valid"):
        images = load_split(data, split, model.preprocessing, classes=ckpt.classes)
        with torch.no_grad():
            x = torch.stack([images[i][0] for i in range(len(images))])
            features.append(model.features(x).numpy().astype(np.float64))
        labels += [y for _, y in images.samples]
    features, labels = np.concatenate(features), np.array(labels)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(0) for c in range(len(ckpt.classes))])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def test_calibrate_command_runs_a_fine_tuned_checkpoints_own_blocks(data, tmp_path, capsys):
    config = TrainConfig(**{**FAST, "learning_rate": 0.05}, epochs=3, finetune=2)
    result = training.run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", **QUIET)
    frozen = training.run_training(TrainConfig(**FAST, epochs=1), data, save_dir=tmp_path / "frozen",
                                   cache_dir=tmp_path / "c", **QUIET)
    assert main(["calibrate", str(result.best_path), str(data), "--unknown_score", "cosine", "--workers", "0",
                 "--quiet", "--cache_dir", str(tmp_path / "c")]) == 0
    tuned = load_checkpoint(result.best_path)
    expected = centre_crop_class_directions(tuned, data)
    assert np.allclose(tuned.calibration.arrays["directions"], expected, atol=2e-2)
    # ...which are not the frozen backbone's: the frozen features' directions differ.
    assert main(["calibrate", str(frozen.best_path), str(data), "--unknown_score", "cosine", "--workers", "0",
                 "--quiet", "--cache_dir", str(tmp_path / "c")]) == 0
    plain = load_checkpoint(frozen.best_path).calibration.arrays["directions"]
    assert not np.allclose(plain, expected, atol=2e-2)


def test_search_trains_the_blocks_of_a_trial_that_fine_tunes(data, tmp_path):
    """A fine-tuning trial trains as train.py does (same blocks, rows, seeds), so its score is real;
    the rows below each split point are loaded once for all the trials."""
    from flower_classifier.backbones import frozen_part
    from flower_classifier.features import load_feature_data
    from flower_classifier.search import rows_per_split, run_trial, sample_params

    import random

    rng = random.Random(0)
    assert {sample_params(rng, blocks=2)["finetune"] for _ in range(100)} <= {0, 1, 2}
    pristine = build_backbone("tiny")
    loads = []

    def load(n):
        loads.append(n)
        return load_feature_data(data, frozen_part(pristine, n), cache_dir=tmp_path / "c", **QUIET)

    rows = rows_per_split(load)
    config = TrainConfig(**FAST, epochs=3, finetune=1, schedule="cosine")
    trial = run_trial(rows(1), config, backbone=pristine)
    again = run_trial(rows(1), config, backbone=pristine)  # from the pretrained blocks again, not the last trial's
    assert loads == [1] and trial == again
    trained = training.run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", **QUIET)
    last = trained.state.history[-1]
    assert trial["valid_loss"] == pytest.approx(last["valid_loss"], abs=1e-6)
    assert trial["valid_accuracy"] == last["valid_accuracy"]


def test_search_command_searches_finetune(data, tmp_path, capsys):
    import json

    out = tmp_path / "hp.json"
    assert main(["search", str(data), "--trials", "6", "--arch", "tiny", "--workers", "0", "--quiet",
                 "--out", str(out), "--cache_dir", str(tmp_path / "c")]) == 0
    trials = json.loads(out.read_text())["trials"]
    assert {t["params"]["finetune"] for t in trials} - {0}  # some trial fine-tuned
    assert all(t["params"]["finetune"] <= 2 for t in trials)  # tiny has 2 blocks


def test_too_many_blocks_is_refused_in_one_line_before_any_work(data, tmp_path, capsys):
    save = tmp_path / "ck"
    status = single_command_main("train", "train.py", [str(data), "--arch", "tiny", "--finetune", "3", "--quiet",
                                                       "--workers", "0", "--save_dir", str(save),
                                                       "--cache_dir", str(tmp_path / "c")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1 and "--finetune 3" in err[0] and "2 blocks" in err[0], err
    assert not save.exists() and not (tmp_path / "c").exists()



def test_negatives_go_through_the_fine_tuned_blocks_too(data, tmp_path):
    from conftest import make_image
    from flower_classifier.backbones import frozen_part
    from flower_classifier.calibrating import calibrate_checkpoint, calibration_data
    from flower_classifier.images import decode_image, list_photos, preprocess

    negatives = tmp_path / "negatives"
    for k in range(4):
        make_image(negatives / f"n{k}.jpg", (20 * k, 200, 30), seed=k)
    said = []
    result = training.run_training(TrainConfig(**{**FAST, "learning_rate": 0.05}, epochs=2, finetune=1), data,
                                   save_dir=tmp_path / "ck", cache_dir=tmp_path / "c", negatives=negatives,
                                   log=said.append, progress=False)
    assert any(line.startswith("Calibrated on") and str(negatives) in line for line in said), said
    # The negatives' features that calibration sees are the fine-tuned model's, photo for photo.
    ckpt = load_checkpoint(result.best_path)
    backbone = build_backbone("tiny")
    rows = calibration_data(data, ckpt.classes, frozen_part(backbone, 1), negatives=negatives,
                            cache_dir=tmp_path / "c", progress=False)
    _, seen = calibrate_checkpoint(ckpt, ckpt.classes, rows, method="msp", keep=0.95,
                                   top=split_backbone(backbone, 1)[1])
    photos = torch.stack([torch.from_numpy(preprocess(decode_image(p), ckpt.preprocessing))
                          for p in list_photos(negatives)])
    with torch.no_grad():
        tuned = build_model(ckpt, backbone=build_backbone("tiny")).features(photos).numpy()
        frozen = build_backbone("tiny").module(photos).numpy()
    assert np.allclose(seen.negatives, tuned, atol=2e-2)
    assert not np.allclose(seen.negatives, frozen, atol=2e-2)
