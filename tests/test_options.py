"""Options declared once (config.TrainConfig's fields): the command line, the Python API and
hyperparameters.json refuse the same bad numbers in one line, before any work; the CLI's friendlier
spellings; names by default; a torch-free parser; the SIGTERM handler given back."""
import json
import math
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_dataset
from flower_classifier.cli import COMMANDS, build_parser, main
from flower_classifier.config import FIELDS, TrainConfig, field_problem, flag, load_defaults
from flower_classifier.errors import UserError
from flower_classifier.search import SEARCHED, sample_params


def _one_line_refusal(capsys, argv, *needles):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses from inside parse_args
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert "Traceback" not in err[0]


# ---------------------------------------------------------------- the command line's corpus

HUGE = ["1e20", "100000000000", "99999999999999999999999"]
NOT_NUMBERS = ["nan", "inf", "-inf", "NaN", "ten", "", "0x10"]

CLI_CASES = [  # (command and its positional arguments, option, bad values)
    (["train", "D"], "--hidden_units", HUGE + NOT_NUMBERS + ["0", "-8", "1.5", "65537"]),
    (["train", "D"], "--batch_size", HUGE + NOT_NUMBERS + ["0", "-1", "65537", "2.0"]),
    (["train", "D"], "--epochs", HUGE + NOT_NUMBERS + ["0", "-1", "100001", "2.5"]),
    (["train", "D"], "--seed", HUGE + NOT_NUMBERS + ["-1", "4294967296", "0.5"]),
    (["train", "D"], "--learning_rate", ["0", "-0.001", "nan", "inf", "-inf", "1e20", "11", "fast"]),
    (["train", "D"], "--dropout", ["nan", "inf", "-0.1", "1", "1.5", "1e20", "half"]),
    (["train", "D"], "--label_smoothing", ["nan", "inf", "-inf", "-0.1", "1", "2", "1e20"]),
    (["train", "D"], "--weight_decay", ["nan", "inf", "-1", "1e20", "11"]),
    (["train", "D"], "--workers", HUGE + NOT_NUMBERS + ["-1", "257"]),
    (["train", "D"], "--augmented_views", HUGE + NOT_NUMBERS + ["-1", "101"]),
    (["train", "D"], "--finetune", HUGE + NOT_NUMBERS + ["-1", "1001", "1.5"]),
    (["train", "D"], "--backbone_lr_factor", ["0", "-0.1", "1.5", "nan", "inf", "1e20", "slow"]),
    (["train", "D"], "--patience", HUGE + NOT_NUMBERS + ["-1", "100001", "2.5"]),
    (["search", "D"], "--trials", HUGE + NOT_NUMBERS + ["0", "-3", "10001"]),
    (["search", "D"], "--seed", ["nan", "1e20", "-1"]),
    (["search", "D"], "--augmented_views", ["1e20", "-1", "inf"]),
    (["search", "D"], "--workers", ["1e20", "-1"]),
    (["predict", "p.jpg", "m.onnx"], "--top_k", HUGE + NOT_NUMBERS + ["0", "-3", "10001"]),
    (["serve", "m.onnx"], "--max_upload_mb", ["inf", "nan", "-inf", "0", "-5", "1e20", "1025"]),
    (["serve", "m.onnx"], "--port", HUGE + NOT_NUMBERS + ["0", "-1", "65536"]),
    (["serve", "m.onnx"], "--parallel", ["0", "65", "1e20", "nan"]),
    (["evaluate", "c.pth", "S"], "--batch_size", ["0", "1e20", "nan", "65537"]),
    (["evaluate", "c.pth", "S"], "--workers", ["-1", "1e20", "257"]),
    (["report", "c.pth", "S"], "--top", ["0", "1e20", "10001"]),
    (["report", "c.pth", "S"], "--mistakes", ["0", "1e20", "1001"]),
    (["check-data", "D"], "--max_imbalance", ["nan", "inf", "0", "0.5", "-1", "1e20"]),
]


@pytest.mark.parametrize("command, option, value",
                         [(c, o, v) for c, o, values in CLI_CASES for v in values])
def test_every_bad_number_on_the_command_line_is_one_line_and_exit_2(command, option, value, capsys, monkeypatch,
                                                                     tmp_path):
    monkeypatch.chdir(tmp_path)  # no hyperparameters.json here; and no work could start anyway
    _one_line_refusal(capsys, [*command, f"{option}={value}"], option, "(see --help)")


def test_the_same_bad_numbers_through_train_py(tmp_path):
    """train.py, a fresh process: the refusal comes before anything is created."""
    for args, option in [(["--batch_size", "1e20"], "--batch_size"), (["--label-smoothing", "nan"], "--label_smoothing"),
                         (["--hidden_units", "100000000000"], "--hidden_units"), (["--seed", "1e20"], "--seed")]:
        result = subprocess.run([sys.executable, "train.py", str(tmp_path / "D"), "--save_dir", str(tmp_path / "ck"),
                                 *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1 and option in err[0], result.stderr
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------- the Python API's corpus

API_CASES = [
    ({"hidden_units": (10**11,)}, "hidden_units must be <= 65536"),
    ({"hidden_units": ()}, "hidden_units must be a list of integers"),
    ({"hidden_units": [64] * 17}, "hidden_units must have at most 16 layers"),
    ({"hidden_units": [64, 0]}, "hidden_units must be >= 1"),
    ({"hidden_units": [64.0]}, "hidden_units must be a list of integers"),
    ({"hidden_units": None}, "hidden_units must be a list of integers"),
    ({"batch_size": 10**20}, "batch_size must be <= 65536"),
    ({"batch_size": 1e20}, "batch_size must be an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": 2**40}, "seed must be <= 4294967295"),
    ({"seed": 1e20}, "seed must be an integer"),
    ({"label_smoothing": float("nan")}, "label_smoothing must be a finite number"),
    ({"label_smoothing": 1.0}, "label_smoothing must be <= 0.99"),
    ({"label_smoothing": -0.1}, "label_smoothing must be >= 0"),
    ({"label_smoothing": "0.1"}, "label_smoothing must be a number"),
    ({"dropout": math.inf}, "dropout must be a finite number"),
    ({"dropout": 1}, "dropout must be <= 0.99"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"learning_rate": np.float64("nan")}, "learning_rate must be a finite number"),
    ({"learning_rate": -math.inf}, "learning_rate must be a finite number"),
    ({"learning_rate": 1e20}, "learning_rate must be <= 10"),
    ({"weight_decay": -1e-3}, "weight_decay must be >= 0"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"epochs": True}, "epochs must be an integer"),
    ({"epochs": 10**9}, "epochs must be <= 100000"),
    ({"num_workers": 1000}, "num_workers must be <= 256"),
    ({"augmented_views": 101}, "augmented_views must be <= 100"),
    ({"arch": 5}, "arch must be a string"),
    ({"augment": "yes"}, "augment must be True or False"),
    ({"feature_cache": 0}, "feature_cache must be True or False"),
    ({"extra": []}, "extra must be a dict"),
]


@pytest.mark.parametrize("kw, message", API_CASES)
def test_every_bad_value_from_python_is_refused_in_one_line(kw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        TrainConfig(**kw)
    assert "\n" not in str(e.value)


def test_label_smoothing_is_checked_by_the_config_too():
    """The drift the issue found: the CLI checked it, TrainConfig did not."""
    with pytest.raises(UserError, match="label_smoothing"):
        TrainConfig(label_smoothing=5.0)
    assert TrainConfig(label_smoothing=0.1, learning_rate=1).learning_rate == 1.0  # an int is a number


def test_every_option_has_one_range_that_the_cli_and_the_config_share():
    """At each end of each range: accepted by both, or refused by both, just past it."""
    parser = build_parser()[1]["train"]
    options = {a.dest: a for a in parser._actions}
    for name, f in FIELDS.items():
        if name == "extra":
            continue
        assert flag(name) in parser._option_string_actions, name  # every field is an option of train
        number = f.metadata["number"]
        if number is None:
            continue
        parse = options[name].type
        for value in (number.lo if not number.lo_open else number.lo * 1.5 or 1e-9, number.hi):
            value = number.kind(value)
            assert parse(str(value)) == value
            assert field_problem(name, value if name != "hidden_units" else [value]) is None
        for value in (number.hi + 1, number.lo - 1) if number.kind is int else (number.hi * 2 + 1, number.lo - 1):
            with pytest.raises(Exception):
                parse(str(value))
            assert field_problem(name, value if name != "hidden_units" else [value])
        with pytest.raises(UserError, match=name):
            TrainConfig(**{name: [number.hi + 1] if name == "hidden_units" else number.kind(number.hi + 1)})


# ---------------------------------------------------------------- hyperparameters.json's corpus

JSON_CASES = [
    ("[1, 2]", "expected a JSON object"),
    ('"learning_rate"', "expected a JSON object"),
    ("3", "expected a JSON object"),
    ("null", "expected a JSON object"),
    ('{"hyperparameters": [0.001]}', "expected a JSON object"),
    ('{"learning_rate": "fast"}', "learning_rate must be a number"),
    ('{"learning_rate": NaN}', "learning_rate must be a finite number"),
    ('{"learning_rate": Infinity}', "learning_rate must be a finite number"),
    ('{"learning_rate": 0}', "learning_rate must be > 0"),
    ('{"batch_size": 1e20}', "batch_size must be an integer"),
    ('{"batch_size": 100000000000000000000}', "batch_size must be <= 65536"),
    ('{"hidden_units": [100000000000]}', "hidden_units must be <= 65536"),
    ('{"hidden_units": "512"}', "hidden_units must be a list of integers"),
    ('{"seed": -1}', "seed must be >= 0"),
    ('{"epochs": 2.5}', "epochs must be an integer"),
    ('{"epochs": true}', "epochs must be an integer"),
    ('{"augment": "no"}', "augment must be True or False"),
    ('{"hyperparameters": {"dropout": 1.5}}', "dropout must be <= 0.99"),
    ('{"hyperparameters": {"label_smoothing": -1}}', "label_smoothing must be >= 0"),
    ('{"hyperparameters": {"arch": null}}', "arch must be a string"),
    ("{not json", "not a readable hyperparameters file"),
    ("", "not a readable hyperparameters file"),
]


@pytest.mark.parametrize("text, message", JSON_CASES)
def test_every_bad_hyperparameters_file_is_refused_naming_the_file_and_key(text, message, tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_defaults(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", JSON_CASES[::4])
def test_train_with_a_bad_hyperparameters_file_is_one_line_before_any_work(text, message, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hyperparameters.json").write_text(text)  # the default file, read without --defaults
    _one_line_refusal(capsys, ["train", str(tmp_path / "D"), "--save_dir", "ck"], "hyperparameters.json", message)
    assert not (tmp_path / "ck").exists()


def test_values_are_said_as_the_flags_that_give_them():
    from flower_classifier.cli.options import as_flags

    assert as_flags({"hidden_units": [512, 256], "augment": False, "feature_cache": True, "num_workers": 3,
                     "learning_rate": 0.01}) == "--hidden_units 512 256 --no_augment --workers 3 --learning_rate 0.01"


def test_unknown_keys_of_a_hyperparameters_file_are_ignored(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"hyperparameters": {"learning_rate": 0.01, "optimizer": "sgd", "extra": 3}}))
    assert load_defaults(path) == {"learning_rate": 0.01}


# ---------------------------------------------------------------- search's space

def test_the_search_space_lies_inside_the_declared_ranges():
    for name in SEARCHED:
        space = FIELDS[name].metadata["search"]
        assert space, name
        for value in space:  # each choice, or both ends of a (low, high) pair
            assert field_problem(name, value) is None, (name, value)
    rng = random.Random(1)
    for _ in range(200):
        params = sample_params(rng)
        assert set(params) == set(SEARCHED)
        assert all(field_problem(k, v) is None for k, v in params.items()), params
        low, high = FIELDS["learning_rate"].metadata["search"]
        assert low <= params["learning_rate"] <= high


# ---------------------------------------------------------------- friendlier command line

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("options") / "flowers", ["1", "2", "3"],
                        per_split={"train": 2, "valid": 1})


def test_hyphenated_options_work_and_help_shows_the_underscore_form(data, capsys):
    _one_line_refusal(capsys, ["train", str(data), "--learning-rate", "abc"], "--learning_rate", "'abc'")
    _one_line_refusal(capsys, ["search", str(data), "--augmented-views=-1"], "--augmented_views", ">= 0")
    _one_line_refusal(capsys, ["check-data", str(data), "--max-imbalance", "nan"], "--max_imbalance")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "--learning_rate" in shown and "--learning-rate" not in shown


@pytest.mark.parametrize("argv, nearest", [
    (["train", "D", "--lerning_rate", "0.1"], "--learning_rate"),
    (["train", "D", "--hiden-units", "8"], "--hidden_units"),
    (["train", "D", "--categories_names=x.json"], "--category_names"),
    (["predict", "p.jpg", "c.pth", "--topk", "3"], "--top_k"),
    (["serve", "m.onnx", "--max_upload", "3", "--prot", "80"], "--max_upload_mb"),  # abbreviations are refused
    (["train", "D", "--epoch", "3"], "--epochs"),  # not taken for --epochs
    (["predict", "p.jpg", "c.pth", "--top", "3"], "--top_k"),
    (["evaluate", "c.pth", "D", "--batch-size", "8", "--neg", "N"], "--negatives"),
    (["serve", "m.onnx", "--max-uplod-mb", "3"], "--max_upload_mb"),
])
def test_an_unknown_option_suggests_the_nearest(argv, nearest, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_refusal(capsys, argv, "unrecognized arguments", f"did you mean {nearest}?")


def test_train_in_process_gives_back_the_sigterm_handler_and_uses_the_folders_names(data, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    (data / "cat_to_name.json").write_text(json.dumps({"1": "daisy", "2": "rose", "3": "tulip"}))

    def mine(*_):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["train", str(data), "--arch", "tiny", "--epochs", "1", "--workers", "0", "--quiet",
                     "--hidden-units", "8", "--learning-rate", "0.02", "--save-dir", "ck"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
        (data / "cat_to_name.json").unlink()
    out = capsys.readouterr().out
    assert f"Category names: {data / 'cat_to_name.json'} (the data folder's own" in out
    from flower_classifier.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "ck" / "checkpoint.pth")
    assert ckpt.cat_to_name == {"1": "daisy", "2": "rose", "3": "tulip"}
    assert ckpt.config.learning_rate == 0.02 and ckpt.config.hidden_units == (8,)  # hyphenated flags used


def test_check_data_flags_a_names_file_that_contradicts_the_folders_own(data, tmp_path, capsys):
    (data / "cat_to_name.json").write_text(json.dumps({"1": "daisy", "2": "rose", "3": "tulip"}))
    other = tmp_path / "oxford.json"
    other.write_text(json.dumps({"1": "pink primrose", "2": "rose", "3": "tulip"}))
    try:
        main(["check-data", str(data), "--category_names", str(other), "--workers", "0", "--quiet"])
        out = capsys.readouterr().out
        main(["check-data", str(data), "--workers", "0", "--quiet"])  # the folder's own names: nothing to flag
        own = capsys.readouterr().out
    finally:
        (data / "cat_to_name.json").unlink()
    [line] = [l for l in out.splitlines() if "otherwise than" in l]
    assert line.startswith("warning: names file names 1 of the 3 categories otherwise than")
    assert "(category 1: 'pink primrose', not 'daisy')" in line and "drop --category_names" in line
    assert "otherwise than" not in own and "names file" not in own


# ---------------------------------------------------------------- without torch

BLOCK_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def _without_torch(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_every_commands_help_builds_without_torch():
    code = """
from flower_classifier.cli import COMMANDS, main
for command in COMMANDS:
    try:
        main([command, '--help'])
    except SystemExit as e:
        assert e.code == 0, command
assert not any(m.split('.')[0] in ('torch', 'torchvision') for m in sys.modules), 'torch imported'
print('ok', len(COMMANDS))
"""
    result = _without_torch(code)
    assert result.returncode == 0 and f"ok {len(COMMANDS)}" in result.stdout, result.stderr


@pytest.mark.parametrize("script", ["train.py", "predict.py"])
def test_the_scripts_outside_the_environment_say_how_to_set_up(script, data, tmp_path):
    code = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    args = [str(data), "--save_dir", str(tmp_path / "ck")] if script == "train.py" else \
        [str(tmp_path / "p.jpg"), str(tmp_path / "checkpoint.pth")]
    result = _without_torch(code, script, *args)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert "lacks torch" in err[0] and "./setup.sh" in err[0] and f".venv/bin/python {script} ..." in err[0]


def test_module_predict_on_an_onnx_model_runs_without_torch(tmp_path):
    """`python -m flower_classifier predict PHOTO model.onnx`, torch unimportable: the parser, the
    names check and ONNX Runtime need none of it."""
    from app_models import tiny_checkpoint
    from conftest import make_image
    from flower_classifier.export import export_onnx

    onnx = export_onnx(tiny_checkpoint(tmp_path / "tiny.pth"), tmp_path / "tiny.onnx")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({str(i): f"bloom {i}" for i in range(1, 7)}))
    photo = make_image(tmp_path / "p.jpg", (200, 40, 40))
    code = "from flower_classifier.cli import main; sys.exit(main(sys.argv[1:]))"
    result = _without_torch(code, "predict", str(photo), str(onnx), "--top-k", "2", "--category_names", str(names),
                            "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["predictions"]
    assert len(rows) == 2 and all(r["name"].startswith("flower ") for r in rows)  # the model's own names win
    assert "otherwise than the names the model was trained with" in result.stderr  # flower N vs bloom N
