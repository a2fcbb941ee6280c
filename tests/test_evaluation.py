"""The evaluation report: per-class numbers and confusion counts for known predictions, files, CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset
from flower_classifier.images import Preprocessing
from flower_classifier.checkpoint import Checkpoint, save_checkpoint
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig
from flower_classifier.evaluation import build_report, write_report
from flower_classifier.model import build_head

CLASSES = ["1", "2", "10"]  # index 2 is category "10"
NAMES = {"1": "pink primrose", "2": "hard-leaved pocket orchid", "10": "globe thistle"}


def one_hot_ish(predicted, confidence):
    """Probabilities (N, 3) whose argmax is `predicted`, with that class at `confidence`."""
    probs = np.full((len(predicted), 3), 0.0)
    for row, (p, c) in enumerate(zip(predicted, confidence)):
        probs[row] = (1 - c) / 2
        probs[row, p] = c
    return probs


@pytest.fixture
def known():
    #           true: 1  1    1    2    2    10   10   10
    targets = [0, 0, 0, 1, 1, 2, 2, 2]
    predicted = [0, 1, 0, 1, 2, 2, 0, 0]
    confidence = [0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.55, 0.65]
    paths = [f"img{i}.jpg" for i in range(8)]
    return build_report(targets, one_hot_ish(predicted, confidence), CLASSES, cat_to_name=NAMES, paths=paths)


def test_confusion_counts_rows_true_columns_predicted(known):
    assert known.confusion.tolist() == [[2, 1, 0],
                                        [0, 1, 1],
                                        [2, 0, 1]]
    assert known.count == 8 and known.accuracy == pytest.approx(4 / 8)


def test_per_class_accuracy_and_names(known):
    rows = known.per_class()
    assert [(r["category"], r["name"], r["images"], r["correct"]) for r in rows] == [
        ("1", "pink primrose", 3, 2), ("2", "hard-leaved pocket orchid", 2, 1), ("10", "globe thistle", 3, 1)]
    assert [r["recall"] for r in rows] == pytest.approx([2 / 3, 1 / 2, 1 / 3])  # the per-class accuracy


def test_precision_recall_and_f1_from_the_confusion_matrix(known):
    """By hand from the matrix above: precision = diagonal / column sum (4, 2, 2 predicted), recall =
    diagonal / row sum, F1 = 2PR / (P + R)."""
    rows = known.per_class()
    assert [r["precision"] for r in rows] == pytest.approx([2 / 4, 1 / 2, 1 / 2])
    assert [r["f1"] for r in rows] == pytest.approx([4 / 7, 1 / 2, 2 / 5])
    for r in rows:
        assert r["f1"] == pytest.approx(2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"]))
    assert known.macro_f1 == pytest.approx((4 / 7 + 1 / 2 + 2 / 5) / 3)


def test_undefined_precision_recall_and_f1_are_none_and_shown_as_a_dash():
    """Class a: 3 images, all found, also predicted for b's image; b: 1 image, never predicted (precision
    undefined, F1 0: missing a class counts against the macro F1); c: no image, never predicted (none)."""
    report = build_report([0, 0, 0, 1], one_hot_ish([0, 0, 0, 0], [0.9] * 4), ["a", "b", "c"])
    a, b, c = report.per_class()
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((3 / 4, 1.0, 6 / 7))
    assert (b["precision"], b["recall"], b["f1"]) == (None, 0.0, 0.0)
    assert (c["precision"], c["recall"], c["f1"]) == (None, None, None)
    assert report.macro_f1 == pytest.approx((6 / 7 + 0) / 2)  # over a and b; c is neither true nor predicted
    table = report.table()
    assert table.startswith(f"accuracy 75.0% on 4 images, 1 wrong, macro F1 {100 * 3 / 7:.1f}%")
    row_c = next(line for line in table.splitlines() if line.split()[:2] == ["c", "c"])
    assert row_c.split()[-3:] == ["-", "-", "-"]


def test_confused_pairs_largest_first(known):
    pairs = known.confused_pairs()
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("globe thistle", "pink primrose", 2),
        ("pink primrose", "hard-leaved pocket orchid", 1),
        ("hard-leaved pocket orchid", "globe thistle", 1)]
    assert pairs[0]["share"] == pytest.approx(2 / 3)


def test_worst_mistakes_are_the_most_confident_wrong_ones(known):
    assert [(m.path, m.true, m.predicted) for m in known.mistakes] == [
        ("img4.jpg", 1, 2), ("img1.jpg", 0, 1), ("img7.jpg", 2, 0), ("img6.jpg", 2, 0)]
    assert [m.confidence for m in known.mistakes] == pytest.approx([0.95, 0.8, 0.65, 0.55])


def test_table_lists_worst_class_first_and_the_pairs(known):
    table = known.table()
    assert table.startswith(f"accuracy 50.0% on 8 images, 4 wrong, macro F1 {100 * (4 / 7 + 0.9) / 3:.1f}%")
    lines = table.splitlines()
    assert lines[2].split() == ["category", "name", "images", "correct", "precision", "recall", "F1"]
    # Worst recall next: globe thistle (category 10), precision 50%, recall 33.3%, F1 40%.
    assert lines[3].split()[-5:] == ["3", "1", "50.0%", "33.3%", "40.0%"] and "globe thistle" in lines[3]
    assert "globe thistle -> pink primrose: 2 (67% of globe thistle)" in table


def test_class_without_images_and_no_names():
    report = build_report([0, 0], [[0.9, 0.1], [0.8, 0.2]], ["a", "b"])
    assert report.names == ["a", "b"] and report.mistakes == [] and report.confused_pairs() == []
    assert report.per_class()[1] == {"category": "b", "name": "b", "images": 0, "correct": 0, "precision": None,
                                     "recall": None, "f1": None}
    assert "no confusions" in report.table()


def test_write_report_saves_table_csv_and_figures(known, tmp_path):
    for i in range(8):
        Image.new("RGB", (40, 30), (20 * i, 100, 50)).save(tmp_path / f"img{i}.jpg")
    known = build_report([0, 0, 0, 1, 1, 2, 2, 2], one_hot_ish([0, 1, 0, 1, 2, 2, 0, 0], [0.9] * 8),
                         CLASSES, cat_to_name=NAMES, paths=[str(tmp_path / f"img{i}.jpg") for i in range(8)])
    files = write_report(known, tmp_path / "out")
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0
    header, first = files["per_class_csv"].read_text().splitlines()[:2]
    assert header == "category,name,images,correct,precision,recall,f1"
    assert first.startswith("1,pink primrose,3,2,0.5,0.66") and first.split(",")[-1].startswith("0.571")
    with Image.open(files["confusion_matrix"]) as im:
        assert im.width > 200 and im.height > 200


def test_report_command_on_a_saved_checkpoint(tmp_path, capsys):
    classes = ["1", "2", "3"]
    data = make_dataset(tmp_path / "flowers", classes, per_split={"test": 3})
    torch.manual_seed(0)
    config = TrainConfig(arch="tiny", hidden_units=(8,))
    head = build_head(16, config.hidden_units, 3, 0.0)
    save_checkpoint(Checkpoint("tiny", Preprocessing(32, 36), head.state_dict(), classes, config,
                               cat_to_name={"1": "daisy", "2": "rose", "3": "tulip"}), tmp_path / "c.pth")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "c.pth"), str(data / "test"), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "on 9 images" in printed and "daisy" in printed and "Wrote report.txt" in printed
    assert sorted(p.name for p in out.iterdir()) == ["calibration.png", "confusion_matrix.png", "per_class.csv",
                                                     "per_class_accuracy.png", "report.txt", "worst_mistakes.png"]
    counts = [int(line.split(",")[2]) for line in (out / "per_class.csv").read_text().splitlines()[1:]]
    assert counts == [3, 3, 3]


def test_report_command_missing_split_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    config = TrainConfig(arch="tiny", hidden_units=(8,))
    save_checkpoint(Checkpoint("tiny", Preprocessing(32, 36), build_head(16, (8,), 2, 0.0).state_dict(),
                               ["a", "b"], config), tmp_path / "c.pth")
    assert main(["report", str(tmp_path / "c.pth"), str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


def test_evaluate_and_report_go_through_the_one_evaluation_loop(tmp_path, monkeypatch):
    """The commands' outputs (logits, features, paths of readable photos; negatives too) come from
    `fitting.evaluate`, the loop validation uses: its figures are theirs, whatever the photos' order."""
    from flower_classifier import evaluation, fitting

    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(k["desc"]) or fitting.evaluate(*a, **k))
    classes = ["1", "2", "3"]
    data = make_dataset(tmp_path / "flowers", classes, per_split={"test": 3})
    (data / "test" / "2" / "broken.jpg").write_bytes(b"not a photo")  # skipped, so not among the paths
    negatives = make_dataset(tmp_path / "neg", ["x"], per_split={"test": 2}) / "test" / "x"
    torch.manual_seed(0)
    config = TrainConfig(arch="tiny", hidden_units=(8,))
    save_checkpoint(Checkpoint("tiny", Preprocessing(32, 36), build_head(16, (8,), 3, 0.0).state_dict(), classes,
                               config), tmp_path / "c.pth")
    figures = evaluation.evaluate_checkpoint(tmp_path / "c.pth", data / "test", negatives=negatives, progress=False)
    assert len(calls) == 2 and figures["count"] == 9 and figures["skipped"] == 1
    predictor = evaluation.load_predictor(tmp_path / "c.pth", onnx=False)
    out = evaluation.model_outputs(predictor.model, evaluation.split_dataset(data / "test", predictor))
    assert len(out.paths) == 9 and "broken.jpg" not in " ".join(out.paths)
    assert out.features.shape == (9, 16) and out.logits.shape == (9, 3)
    for path, logits, target in zip(out.paths, out.logits, out.targets):  # each row is its own photo's
        assert classes[target] == path.split("/")[-2]
        one = evaluation.PhotoList([(path, int(target))], evaluation.eval_transform(predictor.preprocessing))
        with torch.inference_mode():
            np.testing.assert_allclose(predictor.model(one[0][0][None]).numpy()[0], logits, atol=1e-5)
    assert figures["accuracy"] == pytest.approx((out.logits.argmax(1) == out.targets).mean())
