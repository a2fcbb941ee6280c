"""Data edge cases, decided once in `data` and met the same way by both training paths (cached
features and --classic), the feature pass and `check-data`: hidden files, photos in subfolders, one
training category, a training category whose photos are all unreadable."""
import os
import re

import pytest
import torch

from bad_images import CORPUS
from conftest import class_color, make_dataset, make_image
from flower_classifier import data, features, frozen_pass, images, fitting, training
from flower_classifier.backbones import build_backbone
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig
from flower_classifier.datacheck import check_data
from flower_classifier.errors import UserError
from flower_classifier.evaluation import evaluate_checkpoint
from flower_classifier.training import run_training

BROKEN = [c for c in CORPUS if not c.usable]


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny")


def train(root, tmp_path, tiny, *, cached, name="ck", **changes):
    lines = []
    config = TrainConfig(**{**dict(arch="tiny", hidden_units=(8,), epochs=1, batch_size=4, num_workers=0,
                                   augment=False, feature_cache=cached), **changes})
    result = run_training(config, root, save_dir=tmp_path / f"{name}-{cached}", backbone=tiny,
                          cache_dir=tmp_path / "cache", log=lines.append, progress=False)
    return result, lines


def sizes(lines):
    """(training rows, validation rows) from the 'Training ...' line."""
    (line,) = [l for l in lines if l.startswith("Training ")]
    return tuple(map(int, re.search(r"(\d+) training / (\d+) validation", line).groups()))


# ---------------------------------------------------------------- hidden files

def add_hidden_things(root):
    """What macOS, zip tools and editors leave in photo folders: none of it is a photo or a category."""
    for split in ("train", "valid"):
        cat = root / split / "1"
        (cat / "._train_1_0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
        (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        make_image(cat / ".thumbnails" / "small.jpg", (0, 0, 0))  # a hidden folder: not looked into
        make_image(root / split / ".cache" / "x.jpg", (0, 0, 0))  # hidden category folders
        make_image(root / split / "__MACOSX" / "1" / "._x.jpg", (0, 0, 0))
    (root / "train" / "2" / ".~lock.notes#").write_text("editor lock file")


def test_hidden_files_and_folders_are_never_photos_nor_categories(tmp_path):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2, "valid": 1})
    add_hidden_things(root)
    dataset = data.FlowerFolder(root / "train")
    assert dataset.classes == ["1", "2"]
    assert sorted(p.name for p, _ in dataset.samples) == ["train_1_0.jpg", "train_1_1.jpg", "train_2_0.jpg",
                                                         "train_2_1.jpg"]
    assert data.list_categories(root / "valid") == ["1", "2"]
    photos, others = images.scan_category(root / "train" / "1")
    assert [p.name for p in photos] == ["train_1_0.jpg", "train_1_1.jpg"] and others == []
    for name in ("._x.jpg", ".DS_Store", "__MACOSX", ".git"):
        assert images.is_hidden(name)
    for name in ("_x.jpg", "x.jpg", "MACOSX", "a.b"):
        assert not images.is_hidden(name)


@pytest.mark.parametrize("cached", [True, False])
def test_training_and_check_data_see_the_same_photos_without_the_hidden_ones(tmp_path, tiny, capfd, cached):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2, "valid": 1})
    add_hidden_things(root)
    _, lines = train(root, tmp_path, tiny, cached=cached)
    assert sizes(lines) == (4, 2)
    # `._train_1_0.jpg` used to be read by training (and skipped with a warning) but not by check-data.
    assert "warning" not in capfd.readouterr().err
    report = check_data(root)
    assert report.safe and report.warnings == [f"no test/ folder in {root}: nothing to measure the final accuracy on"]
    assert report.counts == {"train": {"1": 2, "2": 2}, "valid": {"1": 1, "2": 1}}


# ---------------------------------------------------------------- photos in subfolders

def nested_data(root):
    """Category 1 keeps some photos one and two folders down (as a phone export or a zip may)."""
    make_dataset(root, ["1", "2"], per_split={"train": 2, "valid": 1})
    make_image(root / "train" / "1" / "day1" / "a.jpg", class_color(0, 2), seed=1)
    make_image(root / "train" / "1" / "day1" / "more" / "b.png", class_color(0, 2), seed=2)
    make_image(root / "train" / "2" / "z" / "c.jpg", class_color(1, 2), seed=3)
    make_image(root / "valid" / "2" / "sub" / "d.jpg", class_color(1, 2), seed=4)
    (root / "train" / "1" / "day1" / "notes.txt").write_text("not a photo")
    return root


def test_photos_in_subfolders_belong_to_their_category(tmp_path):
    root = nested_data(tmp_path / "d")
    dataset = data.FlowerFolder(root / "train")
    rel = [(p.relative_to(root / "train").as_posix(), dataset.classes[y]) for p, y in dataset.samples]
    # Sorted by path within each category: one order on every machine.
    assert rel == [("1/day1/a.jpg", "1"), ("1/day1/more/b.png", "1"), ("1/train_1_0.jpg", "1"),
                   ("1/train_1_1.jpg", "1"), ("2/train_2_0.jpg", "2"), ("2/train_2_1.jpg", "2"), ("2/z/c.jpg", "2")]


def test_a_category_with_photos_only_in_subfolders_is_not_empty(tmp_path):
    root = make_dataset(tmp_path / "d", ["1"], per_split={"train": 2})
    make_image(root / "train" / "2" / "2023" / "june" / "x.jpg", (10, 200, 10))
    dataset = data.FlowerFolder(root / "train")
    assert dataset.classes == ["1", "2"] and len(dataset) == 3


def test_a_folder_link_loop_is_followed_once(tmp_path):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1})
    os.symlink(root / "train" / "1", root / "train" / "1" / "again")  # a loop: 1/again -> 1
    os.symlink(root / "train", root / "train" / "1" / "up")  # up to the split: category 2's photos
    linked = make_image(tmp_path / "elsewhere" / "e.jpg", (10, 10, 10)).parent
    os.symlink(linked, root / "train" / "2" / "linked")  # a link to another folder is looked into
    assert [p.name for p in images.list_photos(root / "train" / "1")] == ["train_1_0.jpg"]
    assert [p.name for p in images.list_photos(root / "train" / "2")] == ["e.jpg", "train_2_0.jpg"]  # linked/e.jpg first


@pytest.mark.parametrize("cached", [True, False])
def test_training_uses_photos_in_subfolders_as_check_data_counts_them(tmp_path, tiny, cached):
    root = nested_data(tmp_path / "d")
    result, lines = train(root, tmp_path, tiny, cached=cached)
    assert sizes(lines) == (7, 3)
    report = check_data(root)
    assert report.counts == {"train": {"1": 4, "2": 3}, "valid": {"1": 1, "2": 2}}
    assert any("train/1/day1/notes.txt" in w for w in report.warnings)  # the same rule for other files
    assert evaluate_checkpoint(result.best_path, root / "valid", progress=False)["count"] == 3


# ---------------------------------------------------------------- one training category

def one_category(root):
    make_dataset(root, ["1"], per_split={"train": 3, "valid": 1})
    return root


def one_category_beside_hidden_ones(root):
    one_category(root)
    make_image(root / "train" / ".trash" / "x.jpg", (0, 0, 0))
    make_image(root / "train" / "__MACOSX" / "x.jpg", (0, 0, 0))
    return root


@pytest.mark.parametrize("setup", [one_category, one_category_beside_hidden_ones])
@pytest.mark.parametrize("cached", [True, False])
def test_one_training_category_is_refused_before_any_work(tmp_path, tiny, monkeypatch, setup, cached):
    root = setup(tmp_path / "d")
    monkeypatch.setattr(training, "build_backbone", lambda *a: pytest.fail("built a backbone"))
    with pytest.raises(UserError, match="has one category folder \\(1\\): a classifier needs at least two"):
        run_training(TrainConfig(arch="tiny", feature_cache=cached), root, save_dir=tmp_path / "ck",
                     log=lambda m: None, progress=False)
    assert not (tmp_path / "ck").exists()
    report = check_data(root)
    assert not report.safe
    assert [p for p in report.problems if p == "train: 1 category (1): a classifier needs at least two; "
            "add category folders of photos"]


def test_one_category_is_refused_by_the_command_line_and_the_search(tmp_path, capsys):
    root = one_category(tmp_path / "d")
    assert main(["train", str(root), "--arch", "tiny", "--save_dir", str(tmp_path / "ck")]) == 2
    assert main(["search", str(root), "--arch", "tiny", "--trials", "1", "--out", str(tmp_path / "h.json")]) == 2
    assert main(["check-data", str(root), "--quiet"]) == 1
    out = capsys.readouterr()
    assert out.err.count("a classifier needs at least two") == 2 and "a classifier needs at least two" in out.out
    assert not (tmp_path / "h.json").exists()


def test_a_valid_or_test_split_may_hold_one_category(tmp_path, tiny):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2, "valid": 1})
    make_dataset(root, ["2"], per_split={"test": 2})
    result, _ = train(root, tmp_path, tiny, cached=True)
    assert evaluate_checkpoint(result.best_path, root / "test", progress=False)["count"] == 2


# ---------------------------------------------------------------- a category with no readable photo

def all_broken(category):
    for item in BROKEN:  # corrupt, empty, truncated (a valid header), text named .jpg, ...
        item.write(category / item.name, (0, 0, 0))


def empty_files(category):
    for k in range(3):
        (category / f"empty_{k}.jpg").write_bytes(b"")


def truncated_only(category):
    """Headers that open fine: only a full decode finds out (a cheap header check would not)."""
    for k in range(2):
        whole = make_image(category / f"t{k}.jpg", (0, 0, 0), size=(64, 64), seed=k).read_bytes()
        (category / f"t{k}.jpg").write_bytes(whole[: len(whole) // 2])


@pytest.mark.parametrize("spoil", [all_broken, empty_files, truncated_only])
@pytest.mark.parametrize("cached", [True, False])
def test_a_training_category_without_a_readable_photo_is_refused_before_training(tmp_path, tiny, monkeypatch,
                                                                                  spoil, cached):
    root = make_dataset(tmp_path / "d", ["1", "2", "3"], per_split={"train": 2, "valid": 1})
    for photo in (root / "train" / "3").iterdir():
        photo.unlink()
    spoil(root / "train" / "3")
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError, match=re.escape(f"{root / 'train'}: 1 training category has no readable "
                                                  f"photo (3): add photos or remove the folders")):
        train(root, tmp_path, tiny, cached=cached)
    assert not (tmp_path / f"ck-{cached}" / "checkpoint.pth").exists()
    report = check_data(root)  # check-data says the same
    assert "train: 1 category without a readable image (3): add photos or remove the folders" in report.problems


@pytest.mark.parametrize("cached", [True, False])
def test_one_readable_photo_is_enough(tmp_path, tiny, capfd, cached):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1, "valid": 1})
    all_broken(root / "train" / "2")  # beside its one good photo
    result, lines = train(root, tmp_path, tiny, cached=cached)
    assert result.state.epoch == 1
    err = capfd.readouterr().err
    for item in BROKEN:  # still warned about once each, by the epoch that met it (not by the check)
        assert err.count(str(root / "train" / "2" / item.name)) == 1, err
    assert check_data(root).safe


def test_unreadable_categories_are_listed_in_one_line(tmp_path):
    root = make_dataset(tmp_path / "d", [str(i) for i in range(1, 10)], per_split={"train": 1, "valid": 1})
    for c in ("2", "3", "4", "5", "6", "7", "8"):
        (root / "train" / c / f"train_{c}_0.jpg").write_text("not a photo")
    with pytest.raises(UserError) as caught:
        data.load_split(root, "train", data.Preprocessing(32, 36))
    assert str(caught.value).startswith(f"{root / 'train'}: 7 training categories have no readable photo "
                                        f"(2, 3, 4, 5, 6 and 2 more)")


# ---------------------------------------------------------------- one home for each rule

def test_the_epoch_seed_and_photo_loading_have_one_home():
    assert fitting.epoch_seed is data.epoch_seed  # the loop seeds its epochs with it
    sampler = data.EpochSampler(10, seed=7)
    sampler.set_epoch(3)
    g = torch.Generator().manual_seed(data.epoch_seed(7, 3))
    torch.randint(0, 2**62, (10,), generator=g)
    assert list(sampler) == torch.randperm(10, generator=g).tolist()
    assert frozen_pass.PhotoList is data.PhotoList and not hasattr(frozen_pass, "_Images")


def test_the_feature_pass_warns_once_per_unreadable_photo_as_training_does(tmp_path, tiny, capfd):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2, "valid": 1})
    (root / "train" / "1" / "bad.jpg").write_text("text")
    paths = [p for p, _ in data.FlowerFolder(root / "train").samples]
    _, ok = frozen_pass.extract_features(tiny, paths, frozen_pass.centre_view(tiny), progress=False)
    assert ok.tolist() == [p.name != "bad.jpg" for p in paths]
    (line,) = capfd.readouterr().err.splitlines()
    assert line == f"warning: skipping {root / 'train' / '1' / 'bad.jpg'}: not a readable image (not a format " \
                   f"Pillow reads: JPEG, PNG, WebP, GIF, BMP, TIFF...)"
