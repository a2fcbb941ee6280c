"""`check-data`: each kind of finding, and the exit status that says whether training is safe."""
import json
import shutil

import pytest

from bad_images import CORPUS, write_corpus
from conftest import make_dataset, make_image
from flower_classifier.cli import main
from flower_classifier.datacheck import check_data, format_report
from flower_classifier.errors import UserError

CLASSES = ["1", "2", "3"]


@pytest.fixture
def clean(tmp_path):
    return make_dataset(tmp_path / "d", CLASSES, per_split={"train": 3, "valid": 1, "test": 1})


def one(findings, *needles):
    """The one finding that holds every needle."""
    hits = [f for f in findings if all(n in f for n in needles)]
    assert len(hits) == 1, findings
    return hits[0]


def test_clean_data_is_safe(clean, capsys):
    report = check_data(clean, cat_to_name={c: f"flower {c}" for c in CLASSES})
    assert report.safe and report.problems == [] and report.warnings == []
    assert report.counts == {s: {c: n for c in CLASSES} for s, n in (("train", 3), ("valid", 1), ("test", 1))}
    assert main(["check-data", str(clean), "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{clean}: train 9 images in 3 categories, valid 3 images in 3 categories, "
                      f"test 3 images in 3 categories")
    assert out[-1] == "0 problems, 0 warnings: safe to train"


def test_unreadable_files_are_warnings_each_named(clean):
    write_corpus(clean / "train" / "1")
    report = check_data(clean)
    assert report.safe  # training skips them
    broken = [c.name for c in CORPUS if not c.usable]
    for name in broken:
        one(report.warnings, f"train/1/{name}: ", "training skips it")
    assert len([w for w in report.warnings if "training skips it" in w]) == len(broken)
    assert report.counts["train"]["1"] == 3 + sum(c.usable for c in CORPUS)


def test_empty_training_category_is_a_problem_elsewhere_a_warning(clean):
    (clean / "train" / "4").mkdir()
    (clean / "train" / "5").mkdir()
    (clean / "train" / "5" / "broken.jpg").write_bytes(b"")  # no *readable* image either
    (clean / "test" / "2" / "test_2_0.jpg").unlink()
    report = check_data(clean)
    assert not report.safe
    one(report.problems, "train: 2 categories without a readable image (4, 5)")
    one(report.warnings, "test: 1 category without a readable image (2)")
    one(report.warnings, "valid: no photos of 2 training categories (4, 5)")


def test_category_not_in_train_is_a_problem(clean):
    make_dataset(clean, ["9"], per_split={"valid": 1})
    report = check_data(clean)
    one(report.problems, "valid: 1 category not in train/ (9)", "cannot predict")


def test_missing_splits(tmp_path, clean):
    shutil.rmtree(clean / "test")
    one(check_data(clean).warnings, "no test/ folder")
    shutil.rmtree(clean / "valid")
    one(check_data(clean).problems, "no valid/ folder")
    with pytest.raises(UserError, match="does not exist"):
        check_data(tmp_path / "nowhere")


def test_names_file_missing_and_extra_names(clean):
    report = check_data(clean, cat_to_name={"1": "rose", "7": "tulip", "8": "daisy"})
    assert report.safe
    one(report.warnings, "names file: no name for 2 categories (2, 3)")
    one(report.warnings, "names file: 2 names for categories that no split has (7, 8)")


def test_identical_images_across_splits_and_categories(clean):
    shutil.copy(clean / "train" / "1" / "train_1_0.jpg", clean / "test" / "1" / "copy.jpg")
    shutil.copy(clean / "train" / "2" / "train_2_0.jpg", clean / "train" / "3" / "copy.jpg")
    shutil.copy(clean / "train" / "3" / "train_3_1.jpg", clean / "train" / "3" / "again.jpg")
    report = check_data(clean)
    assert not report.safe
    one(report.problems, "identical images in train and test:", "train/1/train_1_0.jpg", "test/1/copy.jpg")
    one(report.problems, "identical images in different categories:", "train/2/train_2_0.jpg", "train/3/copy.jpg")
    one(report.warnings, "identical images:", "train/3/again.jpg", "train/3/train_3_1.jpg")


def test_class_imbalance_is_flagged_above_the_ratio(clean):
    for k in range(12):  # category 1 gets 15 images, the others 3: a 5x ratio
        make_image(clean / "train" / "1" / f"more_{k}.png", (k * 20, 10, 10), seed=k)
    one(check_data(clean, max_imbalance=4).warnings, "train: class imbalance 5.0x", "category 1: 15", "above 4x")
    assert check_data(clean).warnings == []  # under the default 10x


def test_non_image_files_are_named_as_ignored(clean):
    (clean / "train" / "1" / "photo.heic").write_bytes(b"...")
    (clean / "train" / "1" / ".DS_Store").write_bytes(b"...")  # hidden files are not mentioned
    one(check_data(clean).warnings, "train: 1 file without an image extension, ignored (train/1/photo.heic)")


def test_cli_exit_status_and_output(clean, tmp_path, capsys):
    shutil.copy(clean / "train" / "1" / "train_1_0.jpg", clean / "valid" / "2" / "leak.jpg")
    (clean / "train" / "3" / "empty.jpg").write_bytes(b"")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({c: f"flower {c}" for c in CLASSES[:2]}))
    assert main(["check-data", str(clean), "--category_names", str(names), "--workers", "2", "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("problem: identical images in train and valid")
    assert lines[2].startswith("warning: train/3/empty.jpg: not a readable image")
    assert lines[-1] == "1 problem, 2 warnings: fix the problems before training"
    assert lines == format_report(check_data(clean, cat_to_name={c: f"flower {c}" for c in CLASSES[:2]}), clean)


def test_findings_name_paths_that_hold_colons_and_the_decoder_s_reason(clean):
    """The reason comes from the decoder apart from the file's name (`UnreadableImage.reason`), so a
    folder named 'a: b' is not cut at its colon, as splitting the message at ': ' once did."""
    from flower_classifier.images import UnreadableImage, decode_image

    odd = clean / "train" / "2" / "day: 1"
    write_corpus(odd)
    report = check_data(clean)
    for item in CORPUS:
        if item.usable:
            continue
        with pytest.raises(UnreadableImage) as caught:
            decode_image(odd / item.name)
        assert str(caught.value) == f"{odd / item.name}: {caught.value.reason}"
        one(report.warnings, f"train/2/day: 1/{item.name}: {caught.value.reason}; training skips it")
