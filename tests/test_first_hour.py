"""What a newcomer meets first: the answer leads (a photo of none of the species says so on its first
line, and in every CSV row and JSON object), inputs refused in one line before any model loads, an
offline torchvision backbone refused before torch loads, the command list, `--json`'s help, a names
file meant for other categories, and the model card's word on unknown photos."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from app_models import tiny_checkpoint
from conftest import ROOT, make_dataset, make_image
from flower_classifier import hub
from flower_classifier.calibration import Calibration
from flower_classifier.checkpoint import load_checkpoint, save_checkpoint
from flower_classifier.cli import COMMANDS, build_parser, main
from flower_classifier.cli.predict import unknown_line
from flower_classifier.errors import UserError
from flower_classifier.export import export_onnx
from flower_classifier.predictor import Prediction


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny 6-category model calibrated to call every photo unknown ("all": every msp score is above
    -1) or none ("none"), as checkpoints and ONNX files; and two photos."""
    tmp = tmp_path_factory.mktemp("first_hour")
    base = tiny_checkpoint(tmp / "tiny.pth")
    found = {"photos": [make_image(tmp / "a.png", (200, 60, 60)), make_image(tmp / "b.png", (40, 160, 40))]}
    for name, threshold in (("all", -1.0), ("none", 2.0)):
        ckpt = load_checkpoint(base)
        ckpt.calibration = Calibration(1.0, "msp", threshold, "keeps 95% of 40 photos")
        found[name] = save_checkpoint(ckpt, tmp / f"{name}.pth")
        found[f"{name}.onnx"] = export_onnx(found[name], tmp / f"{name}.onnx")
    return found


# ---------------------------------------------------------------- the answer leads

@pytest.mark.parametrize("model", ["all", "all.onnx"])
def test_an_unknown_photo_says_so_on_its_first_line_then_the_nearest_labelled(models, model, capsys):
    one, two = models["photos"]
    assert main(["predict", str(one), str(models[model]), "--top_k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{one}: unknown: not one of the 6 species this model knows (score " \
                       f"{float(lines[0].split('score ')[1].split(',')[0]):.4g}, above its threshold -1)"
    assert lines[1] == "Nearest species (the photo is none of them):" and len(lines) == 5
    assert main(["predict", str(one), str(two), str(models[model])]) == 0  # several photos: each leads with it
    blocks = capsys.readouterr().out.split("\n\n")
    assert [b.splitlines()[0].split(": unknown: ")[0] for b in blocks] == [str(one), str(two)]


def test_a_known_photo_keeps_its_top_k_first(models, capsys):
    assert main(["predict", str(models["photos"][0]), str(models["none.onnx"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Top 5 for {models['photos'][0]}:") and "unknown" not in out


@pytest.mark.parametrize("model, said", [("all", "true"), ("none", "false"), ("none.onnx", "false")])
def test_every_csv_row_and_json_line_carries_unknown_and_score(models, model, said, tmp_path, capsys):
    table = tmp_path / "t.csv"
    folder = tmp_path / "album"
    folder.mkdir()
    for p in models["photos"]:
        (folder / p.name).write_bytes(p.read_bytes())
    assert main(["predict", str(folder), str(models[model]), "--json", "--csv", str(table), "--top_k", "2"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(answers) == 2
    assert list(rows[0])[:3] == ["path", "unknown", "score"]
    for row, answer in zip(rows, answers):
        assert row["unknown"] == said and answer["unknown"] is (said == "true")
        assert 0 < float(row["score"]) < 1 and float(row["score"]) == pytest.approx(answer["score"])
        assert list(answer)[:3] == ["path", "unknown", "score"]  # the answer before the rows


def test_a_kind_of_unknown_slots_in_after_the_word():
    """Room for saying which sort of unknown (not a flower, a flower it was not trained on)."""
    prediction = Prediction([0.6, 0.4], ["1", "2"], ["rose", "tulip"], unknown=True, score=0.93)
    assert unknown_line(prediction, 5, 0.5) == "unknown: not one of the 5 species this model knows " \
                                               "(score 0.93, above its threshold 0.5)"
    prediction.kind = "not a flower"
    assert unknown_line(prediction, 5, 0.5).startswith("unknown (not a flower): not one of the 5 species")
    assert unknown_line(Prediction([1.0], ["1"], ["rose"], unknown=False, score=0.1), 5, 0.5) is None


def test_one_more_unknown_field_is_one_edit_for_every_output(models, tmp_path, monkeypatch, capsys):
    from flower_classifier.cli import predict as command

    monkeypatch.setattr(command, "UNKNOWN_FIELDS", ("unknown", "kind", "score"))
    table = tmp_path / "t.csv"
    assert main(["predict", *map(str, models["photos"]), str(models["all.onnx"]), "--json", "--csv", str(table)]) == 0
    assert all(list(json.loads(line))[:4] == ["path", "unknown", "kind", "score"]
               for line in capsys.readouterr().out.splitlines())
    assert table.read_text().startswith("path,unknown,kind,score,name_1,")


def test_the_json_help_names_the_fields_json_gives(models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    start = shown.index("print JSON")
    described = set(re.findall(r'"(\w+)"', shown[start:shown.index("--no_unknown", start)]))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a photo")
    assert main(["predict", str(models["photos"][0]), str(broken), str(models["all.onnx"]), "--json"]) == 0
    given = set()
    for line in capsys.readouterr().out.splitlines():
        answer = json.loads(line)
        given |= set(answer) | {k for row in answer.get("predictions", []) for k in row}
    assert described == given


def test_a_names_file_for_other_categories_never_prints_its_wrong_names(models, tmp_path, capsys):
    """Oxford's 102 names given to a model trained with its own names for other flowers."""
    oxford = tmp_path / "cat_to_name.json"
    oxford.write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid", "3": "canterbury bells"}))
    assert main(["predict", str(models["photos"][0]), str(models["none"]), "--category_names", str(oxford),
                 "--top_k", "6"]) == 0
    out, err = capsys.readouterr()
    assert "primrose" not in out and "orchid" not in out and "flower 1" in out
    assert "(category 1: 'pink primrose', not 'flower 1'); showing the model's own names" in err


# ---------------------------------------------------------------- failing fast

def test_bad_inputs_are_refused_before_any_model_loads(models, tmp_path, capsys, monkeypatch):
    from flower_classifier import devices, evaluation, predictor

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    from flower_classifier import export

    for module, name in ((predictor, "load_predictor"), (evaluation, "evaluate_checkpoint"),
                         (evaluation, "report_checkpoint"), (devices, "select_device"), (export, "export_onnx")):
        monkeypatch.setattr(module, name, loaded)
    photo, ckpt = str(models["photos"][0]), str(models["none"])
    not_json = tmp_path / "names.json"
    not_json.write_text("{rose")
    split = make_dataset(tmp_path / "d", ["1", "2"], per_split={"test": 1}) / "test"
    cases = [
        (["predict", str(tmp_path / "gone.jpg"), ckpt], ["gone.jpg: no such file"]),
        (["predict", "https://example.com/rose.jpg", ckpt], ["https://example.com/rose.jpg: a URL",
                                                             "download the photo first", "curl"]),
        (["predict", photo, "HTTP://example.com/a.jpg", ckpt], ["a URL"]),
        (["predict", photo, ckpt, "--category_names", str(tmp_path / "none.json")], ["none.json: no such file"]),
        (["predict", photo, ckpt, "--category_names", str(not_json)], ["names.json: not a JSON file"]),
        (["predict", photo, str(tmp_path / "gone.pth")], ["checkpoint", "gone.pth not found"]),
        (["predict", photo, str(tmp_path / "gone.onnx")], ["model", "gone.onnx not found", "export"]),
        (["predict", photo, ckpt, "--top_k", "0"], ["--top_k", ">= 1"]),
        (["evaluate", str(tmp_path / "gone.pth"), str(split)], ["gone.pth not found"]),
        (["evaluate", ckpt, str(tmp_path / "nowhere")], ["nowhere: no such directory"]),
        (["report", ckpt, str(tmp_path / "nowhere")], ["nowhere: no such directory"]),
        (["export", str(tmp_path / "gone.pth"), str(tmp_path / "m.onnx")], ["gone.pth not found"]),
        (["serve", str(tmp_path / "gone.onnx")], ["gone.onnx not found", "export"]),
    ]
    for argv, needles in cases:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1, (argv, err)
        for needle in needles:
            assert needle in err[0], (argv, err[0])


def _python(code: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


LOADED = "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'scipy'}))"


def test_a_missing_photo_for_a_checkpoint_is_refused_without_importing_torch(models, tmp_path):
    code = f"import sys\nfrom flower_classifier.cli import main\ncode = main(sys.argv[1:])\n{LOADED}\nsys.exit(code)"
    result = _python(code, "predict", str(tmp_path / "gone.jpg"), str(models["none"]))
    assert result.returncode == 2 and "gone.jpg: no such file" in result.stderr
    assert "torch" not in result.stdout, result.stdout


def test_train_with_a_torchvision_backbone_offline_is_refused_before_torch_loads(tmp_path):
    """No network in a test: the connection is made to fail, as it does without internet."""
    data = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1, "valid": 1})
    code = ("import socket, sys\n"
            "def down(*args, **kwargs):\n    raise OSError(101, 'Network is unreachable')\n"
            "socket.create_connection = down\n"
            "from flower_classifier.cli import main\n"
            f"code = main(sys.argv[1:])\n{LOADED}\nsys.exit(code)")
    no_proxy = {v: "" for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")}
    result = _python(code, "train", str(data), "--save_dir", str(tmp_path / "ck"), "--workers", "0",
                     env={"TORCH_HOME": str(tmp_path / "torch_home"), **no_proxy})
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert err[0].startswith("error: --arch vgg16 needs its pretrained weights") and "Network is unreachable" in err[0]
    assert "use --arch efficientnet_lite0" in err[0] and str(tmp_path / "torch_home" / "hub" / "checkpoints") in err[0]
    assert result.stdout.strip() == "[]"  # neither torch nor anything else heavy was imported
    assert not (tmp_path / "ck").exists()


def test_cached_weights_or_a_pip_backbone_need_no_connection(tmp_path, monkeypatch):
    import torch.hub

    probes = []
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: probes.append(1) or "Network is unreachable")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="efficientnet_lite0"):
        hub.check_weights_reachable("resnet50")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth").write_bytes(b"")
    probes.clear()
    for arch in ("resnet50", "efficientnet_lite0", "tiny"):
        hub.check_weights_reachable(arch)
    assert probes == []


def test_the_hub_folder_is_found_as_torch_finds_it_without_torch(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delitem(sys.modules, "torch")  # as before torch is imported
    assert hub.hub_dir() == tmp_path / "th" / "hub"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert str(hub.hub_dir()) == torch.hub.get_dir() == str(tmp_path / "xdg" / "torch" / "hub")


def test_the_onnx_predict_path_imports_neither_torch_nor_scipy(models):
    code = f"import sys\nfrom flower_classifier.cli import main\ncode = main(sys.argv[1:])\n{LOADED}\nsys.exit(code)"
    result = _python(code, "predict", str(models["photos"][0]), str(models["all.onnx"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


# ---------------------------------------------------------------- the command line itself

def test_the_module_alone_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("Commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(COMMANDS)
    result = subprocess.run([sys.executable, "-m", "flower_classifier"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == out


def test_no_parser_takes_an_abbreviation():
    parser, subparsers = build_parser()
    assert not parser.allow_abbrev and all(not p.allow_abbrev for p in subparsers.values())


# ---------------------------------------------------------------- the model card

def test_the_model_card_states_the_unknown_answer_and_the_refusal_rate_it_was_tuned_to(models, tmp_path):
    from flower_classifier import record
    from flower_classifier.backbones import get_spec
    from flower_classifier.config import TrainConfig
    from flower_classifier.runfolder import RunFolder

    data = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1, "valid": 1})
    history = [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "valid_accuracy": 0.5, "valid_top5": 1.0}]

    def card(run):
        return record.model_card(config=TrainConfig(arch="tiny"), data_dir=data, classes=[str(i) for i in range(1, 7)],
                                 cat_to_name=None, history=history, evaluated=None, run=run, feature_dim=16,
                                 preprocessing=get_spec("tiny").preprocessing(), run_id="x")

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    ckpt = load_checkpoint(models["all"])
    ckpt.config.keep = 0.9
    save_checkpoint(ckpt, run.best)
    limits = card(run).split("## Limits")[1]
    assert "gets one of their names" not in limits
    assert "\"unknown: not one of the 6 species\"" in limits and "threshold -1" in limits
    assert "keeps 95% of 40 photos" in limits and "at most about 10% of photos of its own species" in limits
    ckpt.calibration = None
    save_checkpoint(ckpt, run.best)
    assert "has no calibration" in card(run).split("## Limits")[1]


def test_an_uncalibrated_model_s_note_names_a_fix_that_works_for_its_kind(tmp_path, capsys):
    """`calibrate` rewrites a checkpoint, not an ONNX file: the note for an .onnx model sends the
    user to the checkpoint it came from, the note for a checkpoint to the checkpoint itself."""
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    onnx = export_onnx(checkpoint, tmp_path / "tiny.onnx")
    photo = make_image(tmp_path / "p.png", (200, 40, 60))
    for model, fix in ((checkpoint, f"calibrate {checkpoint} DATA_DIR`"),
                       (onnx, "calibrate CHECKPOINT.pth DATA_DIR` on the checkpoint it was exported from")):
        assert main(["predict", str(photo), str(model)]) == 0
        note = capsys.readouterr().err
        assert "has no calibration" in note and fix in note
