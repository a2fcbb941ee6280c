import pytest

from conftest import TWELVE, make_dataset, make_image
from flower_classifier.images import Preprocessing
from flower_classifier.data import find_classes, load_image, load_split, make_loader
from flower_classifier.errors import UserError

P = Preprocessing(32, 36)


def test_classes_sort_naturally_and_labels_map_back_to_folders(twelve_class_data):
    train = load_split(twelve_class_data, "train", P)
    assert train.classes == TWELVE  # "2" before "10", unlike a string sort
    for path, label in train.samples:
        assert train.classes[label] == path.parent.name


def test_valid_split_uses_training_class_order(tmp_path):
    root = make_dataset(tmp_path / "d", TWELVE, per_split={"train": 1})
    make_dataset(tmp_path / "d", ["3", "11"], per_split={"valid": 1})  # valid only has two categories
    train = load_split(root, "train", P)
    valid = load_split(root, "valid", P, classes=train.classes)
    assert {valid.classes[label] for _, label in valid.samples} == {"3", "11"}
    assert [label for _, label in valid.samples] == [2, 10]


def test_val_is_accepted_for_valid(tmp_path):
    root = make_dataset(tmp_path / "d", ["a", "b"], per_split={"train": 1, "val": 1})
    assert len(load_split(root, "valid", P, classes=["a", "b"])) == 2


def test_transforms_give_backbone_size_and_normalization(twelve_class_data):
    for augment in (False, True):
        image, label = load_split(twelve_class_data, "train", P, augment=augment)[0]
        assert image.shape == (3, 32, 32)
        assert image.min() < 0  # normalized, not in [0, 1]


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: (root / "valid").mkdir(parents=True), "train not found"),
    (lambda root: (root / "train").mkdir(parents=True), "no category folders"),
    (lambda root: (root / "train" / "1").mkdir(parents=True), "one category folder \\(1\\): a classifier needs at least two"),
    (lambda root: [(root / "train" / c).mkdir(parents=True) for c in ("1", "2")], "has no images"),
])
def test_bad_layouts_name_the_path(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=message) as e:
        load_split(root, "train", P)
    assert str(root) in str(e.value)


def test_category_missing_from_training_split_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1})
    make_dataset(root, ["7"], per_split={"valid": 1})
    with pytest.raises(UserError, match="training split lacks: 7"):
        load_split(root, "valid", P, classes=["1", "2"])


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 2})
    (root / "train" / "1" / "broken.jpg").write_text("not an image")
    train = load_split(root, "train", P)
    batches = list(make_loader(train, batch_size=10, shuffle=False, num_workers=0))
    assert batches[0][0].shape[0] == 4  # the broken file left out
    assert "broken.jpg" in capsys.readouterr().err


def test_load_image_errors_name_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(UserError, match="notes.jpg: not a readable image"):
        load_image(text)
    with pytest.raises(UserError, match="missing.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")


def test_load_image_converts_modes_to_rgb(tmp_path):
    gray = make_image(tmp_path / "g.png", (100, 100, 100))
    from PIL import Image

    Image.open(gray).convert("L").save(gray)
    assert load_image(gray).mode == "RGB"
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: becomes white
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)


def test_find_classes_ignores_hidden_folders(tmp_path):
    (tmp_path / ".cache").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    assert find_classes(tmp_path) == ["a", "b"]
