"""The record a training run leaves beside its checkpoint: history.csv, training_curves.png,
MODEL_CARD.md, the best epoch on the test split with --test, and TensorBoard when asked."""
import csv
import json
import re

import pytest
from PIL import Image

from conftest import make_dataset
from flower_classifier import record, training
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.cli import single_command_main
from flower_classifier.config import TrainConfig
from flower_classifier.errors import UserError
from flower_classifier.evaluation import evaluate_checkpoint
from flower_classifier.runfolder import CARD_NAME, CURVES_NAME, HISTORY_NAME

CLASSES = ["1", "2", "3", "4"]
QUIET = dict(log=lambda message: None, progress=False)


@pytest.fixture
def data(tmp_path):
    root = make_dataset(tmp_path / "flowers", CLASSES, per_split={"train": 4, "valid": 3, "test": 2})
    (root / "cat_to_name.json").write_text(json.dumps({c: f"flower {c}" for c in CLASSES}))
    return root


def _train(data, save, *flags):
    return single_command_main("train", "train.py", [str(data), "--arch", "tiny", "--hidden_units", "8",
                                                     "--epochs", "4", "--learning_rate", "0.05", "--save_dir",
                                                     str(save), "--workers", "0", "--quiet", *flags])


def test_train_with_test_leaves_history_curves_and_a_card_of_the_best_epoch(data, tmp_path, capsys):
    save = tmp_path / "run"
    assert _train(data, save, "--test") == 0
    out = capsys.readouterr().out
    with open(save / HISTORY_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(record.HISTORY_COLUMNS) and [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert all(float(r["learning_rate"]) == 0.05 and float(r["seconds"]) >= 0 for r in rows)
    best = load_checkpoint(save / "checkpoint.pth")
    assert [float(r["valid_accuracy"]) for r in rows] == [h["valid_accuracy"] for h in best.history + load_checkpoint(
        save / "last.pth").history[best.epoch:]]
    assert Image.open(save / CURVES_NAME).format == "PNG"

    # The test figures are the saved best epoch's, as `evaluate` finds them.
    test = evaluate_checkpoint(save / "checkpoint.pth", data / "test", progress=False)
    figures = f"top-1 {100 * test['accuracy']:.1f}%, top-5 {100 * test['top5']:.1f}%"
    card = (save / CARD_NAME).read_text()
    assert f"Best epoch {best.epoch} of 4" in card and f"({test['count']} photos" in card and figures in card
    assert f"Test split, best epoch {best.epoch}: top-1 accuracy {100 * test['accuracy']:.1f}%" in out
    assert "## Weak spots (test split, best epoch)" in card or "Every test photo" in card
    assert "train 16 photos in 4 categories, valid 12 photos in 4 categories, test 8 photos" in card
    assert "flower 1 (1)" in card and "--hidden_units 8" in card and "--learning_rate 0.05" in card
    assert f"python predict.py PHOTO.jpg {save / 'checkpoint.pth'}" in card
    assert "frozen" in card and "only these 4 categories" in card


def test_a_test_split_copied_from_training_photos_is_not_claimed_unseen(data, tmp_path, capsys):
    import shutil

    for photo in (data / "test" / "1").iterdir():  # the test photos of category 1 become copies of training ones
        shutil.copyfile(next((data / "train" / "1").iterdir()), photo)
    assert _train(data, tmp_path / "run", "--test") == 0
    card = (tmp_path / "run" / CARD_NAME).read_text()
    assert "never seen in training" not in card and "2 are the same files as training or validation photos" in card
    assert "2 test photos are the same files as training or validation photos" in capsys.readouterr().out


def test_weak_spots_name_the_worst_class_and_what_it_is_taken_for(tmp_path):
    """The card's table, from a known evaluation: category 2 is always called 3."""
    import numpy as np

    from flower_classifier.backbones import get_spec
    from flower_classifier.runfolder import RunFolder

    probabilities = np.eye(3)[[0, 0, 2, 2, 2, 2]]  # true 0, 0, 1, 1, 2, 2 -> 0, 0, 2, 2, 2, 2
    report = record.build_report([0, 0, 1, 1, 2, 2], probabilities, ["1", "2", "3"],
                                 cat_to_name={"1": "rose", "2": "daisy", "3": "tulip"})
    evaluated = record.Evaluated("valid", report.accuracy, 1.0, report.count, report)
    history = [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "valid_accuracy": 0.5, "valid_top5": 1.0},
               {"epoch": 2, "train_loss": 0.8, "valid_loss": 0.7, "valid_accuracy": 0.5, "valid_top5": 1.0}]
    data = make_dataset(tmp_path / "d", ["1", "2", "3"], per_split={"train": 1, "valid": 2})
    card = record.model_card(config=TrainConfig(arch="tiny"), data_dir=data, classes=["1", "2", "3"],
                             cat_to_name={"1": "rose", "2": "daisy", "3": "tulip"}, history=history,
                             evaluated=evaluated, run=RunFolder(tmp_path / "run"), feature_dim=16,
                             preprocessing=get_spec("tiny").preprocessing(), run_id="abc")
    weak = [line for line in card.splitlines() if line.startswith("| 2 ")]
    assert weak == ["| 2 | daisy | 2 | 0.0% | tulip (2) |"]
    assert "| 1 |" not in card and "| 3 |" not in card  # right every time: not a weak spot
    assert "Best epoch 1 of 2" in card  # the first of equal epochs, as training keeps it
    assert "No test figures" in card and "Not tested on held-out photos" in card


def test_without_test_the_card_reports_the_validation_split(data, tmp_path):
    result = training.run_training(TrainConfig(arch="tiny", hidden_units=[8], epochs=2, num_workers=0), data,
                                   save_dir=tmp_path / "run", **QUIET)
    assert [p.name for p in result.record] == [HISTORY_NAME, CURVES_NAME, CARD_NAME]
    assert result.evaluated.split == "valid" and result.evaluated.count == 12
    best = max(result.state.history, key=lambda h: h["valid_accuracy"])
    assert result.evaluated.accuracy == pytest.approx(best["valid_accuracy"])  # the best epoch, not the last
    card = result.record[2].read_text()
    assert "**Test split**" not in card and "No test figures" in card


def test_a_resumed_run_records_all_its_epochs(data, tmp_path):
    config = TrainConfig(arch="tiny", hidden_units=[8], epochs=2, num_workers=0)
    training.run_training(config, data, save_dir=tmp_path / "run", **QUIET)
    training.run_training(config.replace(epochs=3), data, save_dir=tmp_path / "run", resume=True, **QUIET)
    with open(tmp_path / "run" / HISTORY_NAME) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_test_without_a_test_split_is_refused_before_training(tmp_path, capsys):
    data = make_dataset(tmp_path / "flowers", CLASSES, per_split={"train": 2, "valid": 1})
    assert _train(data, tmp_path / "run", "--test") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flowers/test not found" in err
    assert not (tmp_path / "run").exists()


class FakeWriter:
    """SummaryWriter's calls that the training uses, recorded."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_epoch(data, tmp_path, monkeypatch):
    FakeWriter.made.clear()
    monkeypatch.setattr(record, "_summary_writer_class", lambda: FakeWriter)
    assert _train(data, tmp_path / "run", "--tensorboard", str(tmp_path / "tb")) == 0
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"loss/train", "loss/valid", "accuracy/train", "accuracy/valid", "top5/valid", "learning_rate"} <= tags
    with open(tmp_path / "run" / HISTORY_NAME) as f:
        history = list(csv.DictReader(f))
    logged = [(step, value) for tag, value, step in writer.scalars if tag == "accuracy/valid"]
    assert logged == [(int(r["epoch"]), float(r["valid_accuracy"])) for r in history]


def test_tensorboard_missing_is_one_line(data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    assert _train(data, tmp_path / "run", "--tensorboard", str(tmp_path / "tb")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"--tensorboard needs the tensorboard package.*pip install", err)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="tensorboard"):
        training.run_training(TrainConfig(arch="tiny", epochs=1), data, save_dir=tmp_path / "run",
                              tensorboard=tmp_path / "tb", **QUIET)
