"""Odd and broken photos: each is used as an upright RGB image or skipped with one warning."""
import re

import pytest
import torch

from bad_images import CORPUS, SIZE, THIN, write_corpus
from conftest import class_color, make_dataset
from flower_classifier import data, images
from flower_classifier.config import TrainConfig
from flower_classifier.data import load_image
from flower_classifier.errors import UserError
from flower_classifier.evaluation import evaluate_checkpoint
from flower_classifier.training import run_training

COLOR = (200, 60, 90)
USABLE = [c for c in CORPUS if c.usable]
BROKEN = [c for c in CORPUS if not c.usable]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), COLOR)[0].parent


@pytest.mark.parametrize("item", CORPUS, ids=[c.name for c in CORPUS])
def test_each_file_is_rgb_or_refused_by_name(corpus, item):
    if item.usable:
        image = load_image(corpus / item.name)
        assert image.mode == "RGB"
        assert image.size in (SIZE, SIZE[::-1], (1, 1))
    else:
        with pytest.raises(UserError, match=re.escape(item.name)):
            load_image(corpus / item.name)


def close(a, b, tol=8):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_exif_orientation_is_applied(corpus):
    image = load_image(corpus / "exif_rotated.jpg")  # stored 48x40: colour on the left, black on the right
    assert image.size == (40, 48)  # turned upright: width and height swap
    assert close(image.getpixel((20, 2)), COLOR) and close(image.getpixel((20, 45)), (0, 0, 0))


def test_transparency_becomes_white_and_16_bit_is_rescaled(corpus):
    for name in ("rgba.png", "palette.png"):
        image = load_image(corpus / name)  # left half transparent
        assert image.getpixel((2, 20)) == (255, 255, 255) and close(image.getpixel((45, 20)), COLOR)
    grey = round(0.299 * COLOR[0] + 0.587 * COLOR[1] + 0.114 * COLOR[2])
    assert close(load_image(corpus / "sixteen_bit.png").getpixel((5, 5)), (grey,) * 3, tol=2)
    assert close(load_image(corpus / "cmyk.jpg").getpixel((5, 5)), COLOR)


def test_the_pixel_limit_is_explicit_and_applies_before_decoding(corpus, monkeypatch):
    assert images.MAX_IMAGE_PIXELS == 64_000_000
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="too large to read \\(48x40 pixels; the limit is 100\\)"):
        load_image(corpus / "png_named.jpg")


@pytest.mark.parametrize("workers, cached", [(0, True), (2, True), (0, False), (2, False)])
def test_training_uses_the_odd_images_and_skips_the_broken_once_each(tmp_path, capfd, workers, cached):
    classes = ["1", "2", "3"]
    root = make_dataset(tmp_path / "d", classes, per_split={"train": 4, "valid": 2})
    for split in ("train", "valid"):
        write_corpus(root / split / "1", class_color(0, 3))
    lines = []
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=2, batch_size=4, num_workers=workers,
                         feature_cache=cached)
    result = run_training(config, root, save_dir=tmp_path / "ck", log=lines.append, progress=False)
    assert result.state.epoch == 2
    err = capfd.readouterr().err
    for split in ("train", "valid"):
        for item in BROKEN:  # warned once, although met in two epochs
            assert sum(str(root / split / "1" / item.name) in line for line in err.splitlines()) == 1, err
        for item in USABLE:
            assert item.name not in err
    assert len([l for l in err.splitlines() if l.startswith("warning: skipping")]) == 2 * len(BROKEN)
    assert sum(f"skipped {2 * len(BROKEN)} unreadable images" in line for line in lines) == 1, lines
    assert torch.isfinite(torch.tensor(result.state.history[-1]["valid_loss"]))
    metrics = evaluate_checkpoint(result.best_path, root / "valid", num_workers=workers, progress=False)
    assert metrics["skipped"] == len(BROKEN) and metrics["count"] == 2 * 3 + len(USABLE)


def test_a_batch_of_only_broken_files_is_left_out(tmp_path, capfd):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2, "valid": 1})
    for item in BROKEN:
        item.write(root / "train" / "1" / item.name, (0, 0, 0))
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=1, batch_size=1, num_workers=0)
    result = run_training(config, root, save_dir=tmp_path / "ck", log=lambda m: None, progress=False)
    assert result.state.epoch == 1
    assert capfd.readouterr().err.count("warning: skipping") == len(BROKEN)


def test_the_docs_state_the_corpus_size():
    from conftest import ROOT

    readme = " ".join((ROOT / "docs" / "robustness.md").read_text().split())
    assert (f"The test corpus (`tests/bad_images.py`) tries {len(CORPUS)} odd or broken files: training uses "
            f"{len(USABLE)} of them") in readme
    assert f"skips the other {len(BROKEN)}," in readme


def test_any_decoder_exception_means_skipped_not_a_crash(tmp_path, monkeypatch):
    from PIL import ImageOps

    path = make_dataset(tmp_path / "d", ["1"], per_split={"train": 1}) / "train" / "1" / "train_1_0.jpg"

    def decoder_bug(image, **options):
        raise IndexError("list index out of range")

    monkeypatch.setattr(ImageOps, "exif_transpose", decoder_bug)
    with pytest.raises(UserError, match="train_1_0.jpg: not a readable image \\(IndexError"):
        load_image(path)


# ---------------------------------------------------------------- thin photos: bounded by what preprocessing allocates

@pytest.mark.parametrize("item", THIN, ids=[c.name for c in THIN])
def test_a_thin_photo_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch, item):
    from PIL import ImageFile

    path = tmp_path / item.name
    item.write(path, COLOR)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    if item.usable:
        assert load_image(path).size == (61, 1)
        return
    with pytest.raises(images.ImageTooLarge, match=re.escape(item.name) + ": too thin to use .*at most 61:1"):
        load_image(path)
    assert decoded == []


def test_the_aspect_limit_keeps_every_resize_within_the_pixel_limit():
    assert images.MAX_ASPECT == 61
    assert images.MAX_SIDE * images.MAX_SIDE * images.MAX_ASPECT <= images.MAX_IMAGE_PIXELS


def test_preprocess_refuses_a_thin_pil_image_before_resizing():
    """A PIL image given to the Python API skips decode_image: preprocess applies the same rule."""
    from PIL import Image

    p = images.Preprocessing()
    assert images.preprocess(Image.new("RGB", (61, 1)), p).shape == (3, 224, 224)
    for size in ((62, 1), (1, 12_000), (0, 5)):
        with pytest.raises(images.UnreadableImage, match="too thin to use|has no pixels"):
            images.preprocess(Image.new("RGB", size), p)


@pytest.mark.parametrize("cached", [True, False])
def test_a_thin_photo_in_the_data_is_skipped_with_a_warning(tmp_path, capfd, cached):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2, "valid": 1})
    for split in ("train", "valid"):
        THIN[0].write(root / split / "1" / THIN[0].name, COLOR)
    config = TrainConfig(arch="tiny", hidden_units=(8,), epochs=1, batch_size=4, num_workers=0,
                         feature_cache=cached)
    result = run_training(config, root, save_dir=tmp_path / "ck", log=lambda m: None, progress=False)
    assert result.state.epoch == 1
    warned = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning: skipping")]
    assert len(warned) == 2 and all(THIN[0].name in l and "too thin" in l for l in warned), warned
