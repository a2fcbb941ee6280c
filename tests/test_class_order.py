"""Output index -> category -> name, wherever a split can disagree with the training split.

The categories "1", "2", "10" sort differently as strings ("1", "10", "2"), and the valid and test
splits lack category "1": a split that numbered its own folders would call "2" index 0 and "10"
index 1, and a model that separates the colours perfectly would then score 0%. Every stage that
reads a split (training's validation, on cached features and in the classic loop; evaluate; report)
and every stage that writes the classes out (checkpoint, ONNX export) is checked on that data.
"""
import csv
import json
import re

import onnx
import pytest

from conftest import ROOT, class_color, make_dataset, make_image
from flower_classifier.backbones import build_backbone
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig
from flower_classifier.evaluation import evaluate_checkpoint, report_checkpoint
from flower_classifier.export import export_onnx
from flower_classifier.features import load_feature_data
from flower_classifier.training import run_training

CLASSES = ["1", "2", "10"]  # natural order; as strings "10" would come before "2"
NAMES = {c: f"flower {c}" for c in CLASSES}
QUIET = dict(progress=False, log=lambda message: None)


def color(category: str):
    return class_color(CLASSES.index(category), len(CLASSES))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train holds all three categories; valid and test lack "1"."""
    root = make_dataset(tmp_path_factory.mktemp("order") / "flowers", CLASSES, per_split={"train": 6})
    for split in ("valid", "test"):
        for category in CLASSES[1:]:
            for k in range(2):
                make_image(root / split / category / f"{category}_{k}.jpg", color(category), seed=10 * len(split) + k)
    return root


def _config(**changes):
    # Well separated colours, no augmentation, no dropout: every split should score 100%.
    base = dict(arch="tiny", epochs=30, learning_rate=0.05, hidden_units=(16,), batch_size=8, num_workers=0,
                dropout=0.0, augment=False)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    result = run_training(_config(), data, save_dir=tmp / "ck", cat_to_name=NAMES, backbone=build_backbone("tiny"),
                          cache_dir=tmp / "cache", **QUIET)
    return result


def test_the_cached_valid_split_takes_the_training_splits_indices(data, tmp_path):
    features = load_feature_data(data, build_backbone("tiny"), cache_dir=tmp_path / "cache", **QUIET)
    assert features.classes == CLASSES
    # valid holds "2" and "10" only: indices 1 and 2 of the training split, not 0 and 1.
    assert sorted(features.valid.labels.tolist()) == [1, 1, 2, 2]
    assert sorted(features.train.labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6


def test_validation_on_cached_features_scores_the_separable_split_fully(trained):
    assert trained.classes == CLASSES
    assert load_checkpoint(trained.best_path).classes == CLASSES
    assert trained.state.history[-1]["valid_accuracy"] == 1.0


def test_validation_in_the_classic_loop_scores_the_separable_split_fully(data, tmp_path):
    result = run_training(_config(feature_cache=False), data, save_dir=tmp_path / "classic",
                          backbone=build_backbone("tiny"), **QUIET)
    assert result.classes == CLASSES
    assert result.state.history[-1]["valid_accuracy"] == 1.0


def test_evaluate_on_a_test_split_lacking_category_1(trained, data, capsys):
    metrics = evaluate_checkpoint(trained.best_path, data / "test", progress=False)
    assert metrics["count"] == 4 and metrics["accuracy"] == 1.0
    assert main(["evaluate", str(trained.best_path), str(data / "test"), "--workers", "0"]) == 0
    assert "top-1 accuracy: 100.0%" in capsys.readouterr().out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A split without "1" and with one photo of "10"'s colour filed under "2": one known mistake."""
    root = tmp_path_factory.mktemp("mixed")
    for category in CLASSES[1:]:
        for k in range(2):
            make_image(root / category / f"{category}_{k}.jpg", color(category), seed=200 + k)
    make_image(root / "2" / "looks_like_10.jpg", color("10"), seed=300)
    return root


def test_report_rows_and_confusions_name_the_right_categories(trained, mixed):
    report = report_checkpoint(trained.best_path, mixed)
    rows = [(r["category"], r["name"], r["images"], r["correct"]) for r in report.per_class()]
    assert rows == [("1", "flower 1", 0, 0), ("2", "flower 2", 3, 2), ("10", "flower 10", 2, 2)]
    assert report.confusion.tolist() == [[0, 0, 0], [0, 2, 1], [0, 0, 2]]
    assert [(p["true"], p["predicted"], p["count"]) for p in report.confused_pairs()] == [
        ("flower 2", "flower 10", 1)]
    (mistake,) = report.mistakes
    assert mistake.path.endswith("looks_like_10.jpg")
    assert (report.classes[mistake.true], report.classes[mistake.predicted]) == ("2", "10")


def test_report_command_writes_the_rows_by_category(trained, mixed, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(trained.best_path), str(mixed), "--out", str(out), "--workers", "0"]) == 0
    with open(out / "per_class.csv") as f:
        rows = [(r["category"], r["name"], r["images"], r["correct"]) for r in csv.DictReader(f)]
    assert rows == [("1", "flower 1", "0", "0"), ("2", "flower 2", "3", "2"), ("10", "flower 10", "2", "2")]
    assert "flower 2 -> flower 10: 1" in (out / "report.txt").read_text()


def test_checkpoint_and_onnx_export_name_each_colour_by_its_category(trained, tmp_path, capsys):
    onnx_path = export_onnx(trained.best_path, tmp_path / "model.onnx")
    meta = {m.key: m.value for m in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["cat_to_name"]) == NAMES
    for category in CLASSES:
        photo = make_image(tmp_path / f"probe_{category}.png", color(category), seed=400)
        for model in (trained.best_path, onnx_path):
            assert main(["predict", str(photo), str(model), "--top_k", "1", "--json"]) == 0
            (top,) = json.loads(capsys.readouterr().out)["predictions"]
            assert (top["category"], top["name"]) == (category, f"flower {category}"), model


def test_the_notebook_scores_and_reports_a_test_split_lacking_category_1(data, tmp_path):
    """The notebook builds its own splits and report: the same chain, run as a learner runs it."""
    from flower_classifier.notebook import execute_notebook

    names = tmp_path / "names.json"
    names.write_text(json.dumps(NAMES))
    knobs = {"DATA_DIR": str(data), "CATEGORY_NAMES": str(names), "ARCH": "tiny", "HIDDEN_UNITS": [16],
             "DROPOUT": 0.0, "LEARNING_RATE": 0.05, "EPOCHS": 15, "BATCH_SIZE": 8, "DEVICE": "cpu",
             "NUM_WORKERS": 0, "SAVE_DIR": str(tmp_path / "ck")}
    nb = execute_notebook(ROOT / "Image_Classifier_Project.ipynb", knobs, cwd=tmp_path, timeout=120)
    # stdout chunks joined as they came within a cell (a chunk may end mid-line), cells by a line break
    printed = "\n".join("".join(o.get("text", "") for o in c.get("outputs", []) if o.get("name") == "stdout")
                        for c in nb.cells if c.cell_type == "code")
    assert "test accuracy 100.0%" in printed and "on 4 images" in printed, printed[-1500:]
    # The report's table: category, name, images, correct, precision, recall, F1; recall kept.
    rows = {c: r for c, r in re.findall(r"^ +(\d+)  flower \d+ +\d+ +\d+ +\S+ +(\S+) +\S+$", printed, re.M)}
    assert rows == {"1": "-", "2": "100.0%", "10": "100.0%"}, printed[-1500:]
