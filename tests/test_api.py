"""The package as a developer calls it from Python: train, reload, predict, export; and the one-line
errors it gives when called the wrong way."""
import json

import pytest
import torch

import flower_classifier as fc
from flower_classifier.config import TrainConfig
from flower_classifier.errors import UserError

from conftest import make_dataset, make_image

QUIET = dict(progress=False, log=lambda m: None)
EPOCHS_TO_LEARN = 40  # on cached features, milliseconds each: the tiny backbone's head learns the colours


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("api") / "flowers", ["1", "2", "3"],
                        per_split={"train": 4, "valid": 2, "test": 2})


def _config(**kw):
    return TrainConfig(**{"arch": "tiny", "epochs": 1, "num_workers": 0, "hidden_units": (8,), **kw})


def test_train_reload_predict_export_from_python(data, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "daisy", "2": "rose", "3": "tulip"}))
    result = fc.run_training(_config(epochs=EPOCHS_TO_LEARN, learning_rate=0.05), data, save_dir=tmp_path / "ck", cat_to_name=str(names),
                             **QUIET)
    assert isinstance(result, fc.TrainResult) and result.epochs_run == EPOCHS_TO_LEARN
    model, ckpt = fc.load_model(result.best_path)
    assert ckpt.cat_to_name == {"1": "daisy", "2": "rose", "3": "tulip"}  # read from the path given
    for category, name in ckpt.cat_to_name.items():  # each test photo is its category's colour
        for photo in sorted((data / "test" / category).iterdir()):
            top = fc.predict(photo, model)  # no top_k: up to 5, so all 3
            assert top.categories[0] == category and top.names[0] == name, photo
            assert sorted(top.names) == ["daisy", "rose", "tulip"]
    onnx = fc.export_onnx(result.best_path, tmp_path / "model.onnx")
    for path in (onnx, result.best_path):  # one interface for both files
        again = fc.load_predictor(path).predict(photo)
        assert again.categories == top.categories
        assert again.probabilities == pytest.approx(top.probabilities, abs=1e-4)


def test_config_refuses_wrong_types_in_one_line():
    assert TrainConfig(hidden_units=512).hidden_units == (512,)
    for kw, needle in [({"epochs": "5"}, "epochs must be an integer (got '5')"),
                       ({"epochs": 2.5}, "epochs must be an integer"),
                       ({"learning_rate": "0.01"}, "learning_rate must be a number"),
                       ({"hidden_units": "512"}, "hidden_units must be a list of integers"),
                       ({"augment": 1}, "augment must be True or False")]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            TrainConfig(**kw)


def test_run_training_refusals_come_before_any_folder_is_made(data, tmp_path):
    save = tmp_path / "ck"
    with pytest.raises(UserError, match="unknown --arch 'vgg'"):
        fc.run_training(_config(arch="vgg"), data, save_dir=save, **QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device 'cuda' is not available on this machine; use 'cpu'"):
            fc.run_training(_config(), data, save_dir=save, device="cuda", **QUIET)
    with pytest.raises(UserError, match="category names must be a dict or a JSON file's path"):
        fc.run_training(_config(), data, save_dir=save, cat_to_name=["daisy"], **QUIET)
    assert not save.exists()


def test_resume_true_means_the_save_dir(data, tmp_path):
    fc.run_training(_config(), data, save_dir=tmp_path / "ck", **QUIET)
    messages = []
    result = fc.run_training(_config(epochs=2), data, save_dir=tmp_path / "ck", resume=True,
                             progress=False, log=messages.append)
    assert result.epochs_run == 1 and any("Resuming from" in m and "after epoch 1" in m for m in messages)


def test_names_that_contradict_the_data_folders_own_file_are_flagged(data, tmp_path):
    (data / "cat_to_name.json").write_text(json.dumps({"1": "daisy", "2": "rose", "3": "tulip"}))
    try:
        messages = []
        fc.run_training(_config(), data, save_dir=tmp_path / "ck",
                        cat_to_name={"1": "pink primrose", "2": "rose", "3": "tulip"},
                        progress=False, log=messages.append)
    finally:
        (data / "cat_to_name.json").unlink()
    [warning] = [m for m in messages if m.startswith("warning")]
    assert "names 1 of the 3 categories otherwise than" in warning and "cat_to_name.json" in warning
    assert "(category 1: 'pink primrose', not 'daisy')" in warning


def test_a_head_that_does_not_match_its_config_is_refused_at_save(data, tmp_path):
    result = fc.run_training(_config(), data, save_dir=tmp_path / "ck", **QUIET)
    ckpt = fc.load_checkpoint(result.best_path)
    ckpt.head_state = fc.build_head(16, (4, 4), 3, 0.0).state_dict()  # rebuilt without updating the config
    with pytest.raises(UserError, match=r"head's layer sizes \[4, 4, 3\] differ from .* \(\[8, 3\]"):
        fc.save_checkpoint(ckpt, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()
    torch.save({**torch.load(result.best_path, weights_only=True), "head_state": ckpt.head_state},
               tmp_path / "old.pth")  # such a file written some other way still loads as one clear line
    with pytest.raises(UserError, match="old.pth: the head's layer sizes"):  # refused at load, naming the file
        fc.load_model(tmp_path / "old.pth")


def test_predict_and_export_called_the_wrong_way(data, tmp_path):
    result = fc.run_training(_config(), data, save_dir=tmp_path / "ck", **QUIET)
    loaded = fc.load_model(result.best_path)
    model = loaded[0]
    photo = make_image(tmp_path / "p.png", (10, 200, 10))
    cases = [
        (lambda: fc.predict(photo, loaded), "load_model returns (model, checkpoint): pass the model"),
        (lambda: fc.predict(photo, fc.FlowerClassifier(torch.nn.Identity(), torch.nn.Identity())),
         "predict needs a model from load_model or build_model"),
        (lambda: fc.predict(photo, model, top_k="3"), "must be an integer"),
        (lambda: fc.predict(torch.zeros(3, 8, 8).numpy(), model), "an image must be a file path, the bytes"),
        (lambda: fc.export_onnx(model, tmp_path / "m.onnx"), "export_onnx takes the checkpoint file's path"),
        (lambda: fc.export_onnx(result.best_path, tmp_path / "m.bin"), "must end in .onnx"),
    ]
    for call, needle in cases:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as caught:
            call()
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- bad values are quoted short

HUGE = "x" * 10_000_000


@pytest.mark.parametrize("changes", [{"schedule": HUGE}, {"engine": HUGE}, {"hidden_units": [HUGE]},
                                     {"epochs": 10**5000}, {"learning_rate": HUGE}])
def test_a_huge_bad_value_makes_a_short_one_line_message(changes):
    with pytest.raises(UserError) as caught:
        TrainConfig(**changes)
    message = str(caught.value)
    assert len(message) < 400 and "\n" not in message
    assert "characters)" in message or "digits" in message


def test_a_huge_string_in_hyperparameters_json_is_a_short_line(tmp_path):
    from flower_classifier.config import load_defaults

    path = tmp_path / "hyperparameters.json"
    for key in ("learning_rate", "schedule", "engine", "hidden_units"):
        path.write_text(json.dumps({"hyperparameters": {key: HUGE}}))
        with pytest.raises(UserError) as caught:
            load_defaults(path)
        assert len(str(caught.value)) < 400 and "(10,000,002 characters)" in str(caught.value), key


def test_every_user_error_is_bounded_even_when_a_value_reaches_it_unquoted():
    message = str(UserError(f"unknown thing {HUGE}; choose another"))
    assert len(message) < 200 and message.endswith("(10,000,001 characters) choose another")
