import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flower_classifier import checkpoint as ckpt_io
from flower_classifier.backbones import build_backbone, get_spec, split_backbone
from flower_classifier.images import Preprocessing
from flower_classifier.checkpoint import Checkpoint, build_model, load_checkpoint, load_model, save_checkpoint
from flower_classifier.config import TrainConfig
from flower_classifier.errors import UserError
from flower_classifier.model import build_head
from flower_classifier.predictor import predict

from app_models import finetuned_checkpoint, photo
from conftest import TWELVE, make_image


def tiny_checkpoint(classes=TWELVE, names=None) -> Checkpoint:
    torch.manual_seed(1)
    config = TrainConfig(arch="tiny", hidden_units=(8,))
    head = build_head(16, config.hidden_units, len(classes), config.dropout)
    return Checkpoint(arch="tiny", preprocessing=Preprocessing(32, 36), head_state=head.state_dict(),
                      classes=list(classes), config=config, cat_to_name=names, epoch=3,
                      metrics={"valid_accuracy": 0.5})


def test_round_trip_keeps_everything(tmp_path):
    saved = tiny_checkpoint(names={"1": "pink primrose"})
    save_checkpoint(saved, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth")
    assert loaded.classes == TWELVE and loaded.config == saved.config and loaded.epoch == 3
    assert loaded.cat_to_name == {"1": "pink primrose"} and loaded.preprocessing == saved.preprocessing
    assert all(torch.equal(loaded.head_state[k], v) for k, v in saved.head_state.items())


def test_reloaded_model_predicts_the_same_probabilities(tmp_path):
    backbone = build_backbone("efficientnet_lite0")
    config = TrainConfig(arch="efficientnet_lite0", hidden_units=(64,))
    head = build_head(backbone.feature_dim, (64,), 12, 0.2)
    torch.nn.init.normal_(head[0].weight, std=0.05)  # make outputs spread out
    ckpt = Checkpoint("efficientnet_lite0", backbone.preprocessing, head.state_dict(), TWELVE, config)
    original = build_model(ckpt, backbone=backbone)
    save_checkpoint(ckpt, tmp_path / "c.pth")
    reloaded, _ = load_model(tmp_path / "c.pth")
    photo = make_image(tmp_path / "p.jpg", (200, 40, 90), size=(300, 260))
    a, b = predict(photo, original, 12), predict(photo, reloaded, 12)
    assert a.categories == b.categories
    assert max(abs(x - y) for x, y in zip(a.probabilities, b.probabilities)) < 1e-6
    assert abs(sum(a.probabilities) - 1) < 1e-5
    assert a.probabilities == sorted(a.probabilities, reverse=True)


def test_vgg16_checkpoint_with_512_head_is_under_60_mb(tmp_path):
    config = TrainConfig(arch="vgg16", hidden_units=(512,))
    head = build_head(25088, (512,), 102, 0.2)  # 25088 = VGG16's 512x7x7 features
    ckpt = Checkpoint("vgg16", Preprocessing(), head.state_dict(), [str(i) for i in range(1, 103)], config)
    path = save_checkpoint(ckpt, tmp_path / "vgg.pth")
    size = path.stat().st_size
    assert 40e6 < size < 60e6  # holds the head (51 MB of float32), not the 528 MB backbone


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint(tiny_checkpoint(), path)
    good = path.read_bytes()
    real_save = torch.save

    def crash_halfway(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError):
        save_checkpoint(tiny_checkpoint(), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good
    assert load_checkpoint(path).epoch == 3
    assert os.listdir(tmp_path) == ["c.pth"]  # no temporary file left behind


def test_a_killed_writers_temp_file_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "c.pth"
    # A second process starts writing c.pth and is killed mid-write, as by SIGKILL or a power cut.
    writer = ("import sys, time\nfrom flower_classifier.files import atomic_write\n"
              "def write(f):\n    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
              "atomic_write(sys.argv[1], write)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "writing"
        [in_progress] = tmp_path.glob(".c.pth.*.tmp")
        save_checkpoint(tiny_checkpoint(), path)
        assert in_progress.exists()  # a writer that is still running keeps its file
    finally:
        proc.kill()
        proc.wait()
    assert in_progress.exists()
    save_checkpoint(tiny_checkpoint(), path)
    assert os.listdir(tmp_path) == ["c.pth"]
    assert load_checkpoint(path).epoch == 3


def test_missing_and_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(UserError, match="nope.pth not found"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UserError, match="text.pth: not a checkpoint"):
        load_checkpoint(tmp_path / "text.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth: not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pth")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"format": ckpt_io.FORMAT, "payload": RunsCode()}, path)
    with pytest.raises(UserError, match="refused to load: it refers to posix.system"):
        load_checkpoint(path)


def test_newer_format_and_unknown_backbone_are_named(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "c.pth")
    raw = torch.load(tmp_path / "c.pth", weights_only=True)
    torch.save({**raw, "format_version": ckpt_io.FORMAT_VERSION + 1}, tmp_path / "new.pth")
    with pytest.raises(UserError, match="newer than this code reads"):
        load_checkpoint(tmp_path / "new.pth")
    torch.save({**raw, "arch": "vit_giant"}, tmp_path / "arch.pth")
    with pytest.raises(UserError, match="'vit_giant', which this version does not know"):
        load_checkpoint(tmp_path / "arch.pth")


def test_predict_returns_names_when_known(tmp_path):
    ckpt = tiny_checkpoint(names={c: f"flower {c}" for c in TWELVE})
    model = build_model(ckpt)
    photo = make_image(tmp_path / "p.png", (10, 200, 10))
    result = predict(photo, model, top_k=3)
    assert len(result.names) == 3 and result.names == [f"flower {c}" for c in result.categories]
    with pytest.raises(UserError, match="--top_k must be between 1 and the model's 12"):
        predict(photo, model, top_k=13)


# ---------------------------------------------------------------- the training-state file (--resume)

def save_state(path, epoch=1, head_state=None):
    head = build_head(16, (8,), 12, 0.0)
    optimizer = torch.optim.AdamW(head.parameters())
    ckpt_io.save_training_state(path, epoch=epoch, optimizer_state=optimizer.state_dict(),
                                history=[{"epoch": epoch}], best_metric=0.5, head_state=head_state or head.state_dict(),
                                run_id="0123abcd")


@pytest.mark.parametrize("write", ["checkpoint", "state"])
def test_a_process_killed_while_saving_leaves_the_previous_file(tmp_path, write):
    """SIGKILL in the middle of torch.save (in a forked child): the old file is intact and loads."""
    path = tmp_path / "f.pth"
    save = (lambda epoch: save_checkpoint(tiny_checkpoint(), path)) if write == "checkpoint" else \
        (lambda epoch: save_state(path, epoch))
    load = load_checkpoint if write == "checkpoint" else ckpt_io.load_training_state
    save(1)
    good = path.read_bytes()
    pid = os.fork()
    if pid == 0:  # the child writes half a file, then dies without any cleanup
        def killed_halfway(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed_halfway
        save(2)
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == good
    assert load(path)["epoch"] == 1 if write == "state" else load(path).epoch == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "f.pth"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".f.pth.") and leftovers[0].endswith(".tmp")


def test_state_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.state.pth"
    save_state(path)
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (f.write(b"partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_state(path, epoch=2)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["last.state.pth"]


def test_state_file_that_would_run_code_or_is_newer_is_refused(tmp_path):
    torch.save({"format": ckpt_io.STATE_FORMAT, "optimizer": RunsCode()}, tmp_path / "evil.state.pth")
    with pytest.raises(UserError, match="refused to load: it refers to posix.system"):
        ckpt_io.load_training_state(tmp_path / "evil.state.pth")
    save_state(tmp_path / "s.pth")
    raw = torch.load(tmp_path / "s.pth", weights_only=True)
    torch.save({**raw, "format_version": ckpt_io.FORMAT_VERSION + 1}, tmp_path / "new.pth")
    with pytest.raises(UserError, match="training-state format version 2 is newer than this code reads"):
        ckpt_io.load_training_state(tmp_path / "new.pth")
    save_checkpoint(tiny_checkpoint(), tmp_path / "c.pth")
    with pytest.raises(UserError, match="not a training-state file"):
        ckpt_io.load_training_state(tmp_path / "c.pth")


def test_every_torch_load_in_the_code_is_weights_only():
    from conftest import ROOT

    lines = [(p.name, line.strip()) for p in (ROOT / "flower_classifier").glob("*.py")
             for line in p.read_text().splitlines() if "torch.load(" in line]
    assert len(lines) >= 2 and all("weights_only=True" in line for _, line in lines), lines


# ---------------------------------------------------------------- edited checkpoints: validated as data

def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _edits(raw: dict) -> list[tuple[str, dict, list[str]]]:
    """(case, edited checkpoint, words its one-line refusal must hold): every field wrong in several ways."""
    head = raw["head_state"]
    pre, config = raw["preprocessing"], raw["config"]
    tuned = {**config, "finetune": 1}  # the tiny backbone's top block: "0.0" its conv, "0.1" its BatchNorm
    top = {k: v.clone() for k, v in split_backbone(build_backbone("tiny"), 1)[1].state_dict().items()}
    nan_top = {**top, "0.0.weight": top["0.0.weight"].clone().index_fill_(0, torch.tensor([2]), float("nan"))}
    nan_head = {k: v.clone() for k, v in head.items()}
    nan_head["0.weight"][0, 0] = float("nan")
    inf_head = {k: v.clone() for k, v in head.items()}
    inf_head["3.bias"][3] = float("inf")
    cases = [
        ("top level a list", [1, 2], ["not a checkpoint of this project"]),
        ("no marker", _without(raw, "format"), ["not a checkpoint of this project"]),
        ("version 0", {**raw, "format_version": 0}, ["'format_version'", "positive integer", "got 0"]),
        ("version -1", {**raw, "format_version": -1}, ["'format_version'", "positive integer"]),
        ("version text", {**raw, "format_version": "1"}, ["'format_version'", "got '1'"]),
        ("version float", {**raw, "format_version": 1.5}, ["'format_version'", "got 1.5"]),
        ("version bool", {**raw, "format_version": True}, ["'format_version'", "got True"]),
        ("version missing", _without(raw, "format_version"), ["'format_version'", "got None"]),
        ("version newer", {**raw, "format_version": 7}, ["format version 7 is newer", "(version 1)"]),
        ("arch unknown", {**raw, "arch": "vit_giant"}, ["'vit_giant', which this version does not know"]),
        ("arch a number", {**raw, "arch": 5}, ["'arch'", "got 5"]),
        ("arch missing", _without(raw, "arch"), ["'arch' is missing"]),
        ("arch other than config's", {**raw, "arch": "efficientnet_lite0"}, ["'config' names backbone 'tiny'"]),
        ("arch and config edited", {**raw, "arch": "efficientnet_lite0",
                                    "config": {**config, "arch": "efficientnet_lite0"}},
         ["'0.weight' has shape [8, 16]", "efficientnet_lite0 (1280 features)", "need [8, 1280]"]),
        ("preprocessing missing", _without(raw, "preprocessing"), ["'preprocessing'", "must be a dict"]),
        ("preprocessing text", {**raw, "preprocessing": "224"}, ["'preprocessing'", "must be a dict"]),
        ("input_size huge", {**raw, "preprocessing": {**pre, "input_size": 100000}},
         ["'preprocessing'", "input_size", "from 8 to 1024", "got 100000"]),
        ("input_size zero", {**raw, "preprocessing": {**pre, "input_size": 0}}, ["input_size", "got 0"]),
        ("input_size text", {**raw, "preprocessing": {**pre, "input_size": "224"}}, ["input_size", "got '224'"]),
        ("input_size float", {**raw, "preprocessing": {**pre, "input_size": 32.5}}, ["input_size", "got 32.5"]),
        ("input_size missing", {**raw, "preprocessing": _without(pre, "input_size")}, ["input_size", "got None"]),
        ("resize_size negative", {**raw, "preprocessing": {**pre, "resize_size": -5}}, ["resize_size", "got -5"]),
        ("resize_size huge", {**raw, "preprocessing": {**pre, "resize_size": 10 ** 9}}, ["resize_size"]),
        ("mean nan", {**raw, "preprocessing": {**pre, "mean": [0.5, float("nan"), 0.5]}}, ["mean", "[0, 1]"]),
        ("mean two values", {**raw, "preprocessing": {**pre, "mean": [0.5, 0.5]}}, ["mean", "3 numbers"]),
        ("std zero", {**raw, "preprocessing": {**pre, "std": [0.2, 0.0, 0.2]}}, ["std", "(0, 1]"]),
        ("std text", {**raw, "preprocessing": {**pre, "std": "0.2"}}, ["std"]),
        ("interpolation unknown", {**raw, "preprocessing": {**pre, "interpolation": "cubic"}},
         ["interpolation", "one of nearest, bilinear"]),
        ("head missing", _without(raw, "head_state"), ["head_state must be a dict of named tensors"]),
        ("head a list", {**raw, "head_state": [1, 2]}, ["head_state must be a dict"]),
        ("head of numbers", {**raw, "head_state": {"0.weight": 1.0}}, ["head_state must be a dict"]),
        ("head empty", {**raw, "head_state": {}}, ["layer sizes [] differ", "[8, 12]"]),
        ("head wider", {**raw, "head_state": build_head(16, (9,), 12, 0.0).state_dict()},
         ["layer sizes [9, 12] differ", "[8, 12]"]),
        ("head input other", {**raw, "head_state": build_head(20, (8,), 12, 0.0).state_dict()},
         ["'0.weight' has shape [8, 20]", "need [8, 16]"]),
        ("head extra key", {**raw, "head_state": {**head, "9.bias": torch.zeros(3)}}, ["'9.bias'", "has not"]),
        ("head integers", {**raw, "head_state": {**head, "0.bias": torch.zeros(8, dtype=torch.int64)}},
         ["'0.bias'", "not all finite"]),
        ("head nan", {**raw, "head_state": nan_head}, ["'0.weight'", "not all finite", "lower --learning_rate"]),
        ("head inf", {**raw, "head_state": inf_head}, ["'3.bias'", "not all finite"]),
        ("classes missing", _without(raw, "classes"), ["'classes' is missing"]),
        ("classes empty", {**raw, "classes": []}, ["'classes'", "non-empty list"]),
        ("classes text", {**raw, "classes": "123"}, ["'classes'", "got '123'"]),
        ("classes numbers", {**raw, "classes": list(range(12))}, ["'classes'", "category names"]),
        ("classes repeated", {**raw, "classes": ["1"] * 12}, ["'classes'", "unique"]),
        ("classes one too many", {**raw, "classes": TWELVE + ["13"]}, ["layer sizes [8, 12]", "13 categories"]),
        ("classes one too few", {**raw, "classes": TWELVE[:-1]}, ["layer sizes [8, 12]", "11 categories"]),
        ("names a list", {**raw, "cat_to_name": ["rose"]}, ["'cat_to_name'", "got ['rose']"]),
        ("names not strings", {**raw, "cat_to_name": {"1": 5}}, ["'cat_to_name'", "{'1': 5}"]),
        ("names text", {**raw, "cat_to_name": "rose"}, ["'cat_to_name'"]),
        ("config missing", _without(raw, "config"), ["'config' is missing"]),
        ("config text", {**raw, "config": "lr=1"}, ["'config'", "dict of training options"]),
        ("config hidden text", {**raw, "config": {**config, "hidden_units": "big"}}, ["'config'", "hidden_units"]),
        ("config epochs zero", {**raw, "config": {**config, "epochs": 0}}, ["'config'", "epochs must be >= 1"]),
        ("config dropout 2", {**raw, "config": {**config, "dropout": 2.0}}, ["'config'", "dropout must be <= 0.99"]),
        ("config hidden other", {**raw, "config": {**config, "hidden_units": [64]}}, ["layer sizes [8, 12]", "[64, 12]"]),
        ("config hidden absurd", {**raw, "config": {**config, "hidden_units": [10 ** 11]}}, ["'config'", "hidden_units"]),
        ("epoch negative", {**raw, "epoch": -1}, ["'epoch'", "got -1"]),
        ("epoch text", {**raw, "epoch": "3"}, ["'epoch'", "got '3'"]),
        ("epoch float", {**raw, "epoch": 2.5}, ["'epoch'", "got 2.5"]),
        ("epoch tensor", {**raw, "epoch": torch.tensor(3)}, ["'epoch'", "a tensor"]),
        ("metrics text", {**raw, "metrics": "good"}, ["'metrics'"]),
        ("metrics nested", {**raw, "metrics": {"valid_accuracy": [0.5]}}, ["'metrics'"]),
        ("metrics tensor", {**raw, "metrics": {"valid_accuracy": torch.tensor(0.5)}}, ["'metrics'"]),
        ("history text", {**raw, "history": "none"}, ["'history'"]),
        ("history of numbers", {**raw, "history": [1, 2]}, ["'history'"]),
        ("run id number", {**raw, "run_id": 5}, ["'run_id'", "got 5"]),
        ("run id long", {**raw, "run_id": "x" * 500}, ["'run_id'"]),
        ("top a list", {**raw, "config": tuned, "top_state": [1]}, ["top_state must be a dict of named tensors"]),
        ("top of numbers", {**raw, "config": tuned, "top_state": {"0.0.weight": 1.0}}, ["top_state must be a dict"]),
        ("top missing", {**raw, "config": tuned}, ["top_state '0.0.weight' is missing", "config finetune 1"]),
        ("top on a frozen backbone", {**raw, "top_state": top}, ["top_state holds '0.0.bias'", "finetune 0"]),
        ("top of 2 blocks for 1", {**raw, "config": tuned,
                                   "top_state": split_backbone(build_backbone("tiny"), 2)[1].state_dict()},
         ["top_state '0.0.weight'", "shape [8, 3, 3, 3]", "need torch.float32 of shape [16, 8, 3, 3]"]),
        ("top key dropped", {**raw, "config": tuned, "top_state": _without(top, "0.1.running_var")},
         ["'0.1.running_var' is missing"]),
        ("top extra key", {**raw, "config": tuned, "top_state": {**top, "9.weight": torch.zeros(2)}},
         ["top_state holds '9.weight'", "have not"]),
        ("top half precision", {**raw, "config": tuned, "top_state": {**top, "0.0.bias": top["0.0.bias"].half()}},
         ["'0.0.bias' is torch.float16", "need torch.float32"]),
        ("top nan", {**raw, "config": tuned, "top_state": nan_top}, ["'0.0.weight'", "not all finite"]),
        ("finetune past the blocks", {**raw, "config": {**config, "finetune": 3}}, ["finetune 3", "tiny has 2 blocks"]),
    ]
    return cases


def test_every_edited_field_is_refused_in_one_line_naming_it(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "good.pth")
    raw = torch.load(tmp_path / "good.pth", weights_only=True)
    assert load_checkpoint(tmp_path / "good.pth").classes == TWELVE  # the unedited file loads
    cases = _edits(raw)
    assert len(cases) >= 60
    for case, edited, needles in cases:
        path = tmp_path / f"{case.replace(' ', '_')}.pth"
        torch.save(edited, path)
        with pytest.raises(UserError) as refused:
            load_checkpoint(path)
        message = str(refused.value)
        assert "\n" not in message and str(path) in message, (case, message)
        assert all(n in message for n in needles), (case, message)
        assert "version 1 is newer" not in message


def test_edited_checkpoints_through_the_command_line(tmp_path, capsys):
    from flower_classifier.cli import main

    save_checkpoint(tiny_checkpoint(), tmp_path / "good.pth")
    raw = torch.load(tmp_path / "good.pth", weights_only=True)
    photo = make_image(tmp_path / "p.jpg", (200, 40, 90), size=(64, 48))
    assert main(["predict", str(photo), str(tmp_path / "good.pth")]) == 0
    capsys.readouterr()
    for case, edited, needles in _edits(raw):
        path = tmp_path / f"{case.replace(' ', '_')}.pth"
        torch.save(edited, path)
        for command in (["predict", str(photo), str(path)], ["export", str(path), str(tmp_path / "m.onnx")]):
            assert main(command) == 2, (case, command)
            captured = capsys.readouterr()
            err = [line for line in captured.err.splitlines() if line.strip()]
            assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], (case, err)
            assert all(n in err[0] for n in needles) and "Traceback" not in captured.err, (case, err)
    assert not (tmp_path / "m.onnx").exists()


def test_an_absurd_input_size_is_refused_by_a_real_process_before_any_allocation(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "good.pth")
    raw = torch.load(tmp_path / "good.pth", weights_only=True)
    torch.save({**raw, "preprocessing": {**raw["preprocessing"], "input_size": 100000}}, tmp_path / "big.pth")
    photo = make_image(tmp_path / "p.jpg", (200, 40, 90))
    run = subprocess.run([sys.executable, "predict.py", str(photo), str(tmp_path / "big.pth")],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "input_size" in run.stderr and "got 100000" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_head_with_non_finite_weights_is_refused_at_save(tmp_path):
    ckpt = tiny_checkpoint()
    ckpt.head_state["0.weight"][1, 2] = float("nan")
    with pytest.raises(UserError, match=r"not saving .*c.pth: the head's weights '0.weight' are not all finite"):
        save_checkpoint(ckpt, tmp_path / "c.pth")
    with pytest.raises(UserError, match="not all finite"):
        save_state(tmp_path / "s.pth", head_state=ckpt.head_state)
    assert list(tmp_path.iterdir()) == []


def test_preprocessing_from_a_dict_checks_every_value():
    good = Preprocessing(224, 256).to_dict()
    assert Preprocessing.from_dict(good) == Preprocessing(224, 256)
    assert Preprocessing.from_dict({k: v for k, v in good.items() if k != "interpolation"}).interpolation == "bilinear"
    for bad in ({**good, "input_size": 5000}, {**good, "resize_size": True}, {**good, "std": [0.1, 0.1, float("inf")]},
                {**good, "mean": None}, {**good, "interpolation": 3}):
        with pytest.raises(UserError, match="^model.onnx: "):
            Preprocessing.from_dict(bad, where="model.onnx")


def test_building_the_tiny_backbone_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    first = build_backbone("tiny")
    assert torch.equal(torch.rand(5), expected)  # the same draws as if it had not been built
    second = build_backbone("tiny")
    assert all(torch.equal(a, b) for a, b in zip(first.module.state_dict().values(),
                                                 second.module.state_dict().values()))  # fixed weights


# ---------------------------------------------------------------- fine-tuned checkpoints (--finetune)

@pytest.fixture(scope="module")
def lite0_tuned(tmp_path_factory):
    return finetuned_checkpoint(tmp_path_factory.mktemp("tuned") / "lite0.pth", "efficientnet_lite0", 2)


def _frozen_twin(path, tmp_path):
    """The same checkpoint with its fine-tuned blocks dropped: the pretrained backbone under the same head."""
    raw = torch.load(path, weights_only=True)
    torch.save({**_without(raw, "top_state"), "config": {**raw["config"], "finetune": 0}}, tmp_path / "frozen.pth")
    return tmp_path / "frozen.pth"


@pytest.mark.parametrize("arch", ["tiny", "efficientnet_lite0"])
def test_a_finetuned_checkpoint_reloads_to_identical_probabilities(arch, lite0_tuned, tmp_path):
    path = lite0_tuned if arch != "tiny" else finetuned_checkpoint(tmp_path / "tiny.pth", "tiny", 1)
    model, ckpt = load_model(path)
    again, _ = load_model(path)
    assert ckpt.config.finetune > 0 and ckpt.top_state
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.training
    picture = photo("rose.jpg")
    a, b = predict(picture, model, 5), predict(picture, again, 5)
    assert a.categories == b.categories and a.probabilities == b.probabilities
    # The fine-tuned blocks are what it predicts with: without them the same head answers otherwise.
    frozen = predict(picture, load_model(_frozen_twin(path, tmp_path))[0], 5)
    assert max(abs(x - y) for x, y in zip(a.probabilities, frozen.probabilities)) > 1e-3
    # Saving the loaded checkpoint again keeps every fine-tuned weight.
    save_checkpoint(ckpt, tmp_path / "again.pth")
    top = load_checkpoint(tmp_path / "again.pth").top_state
    assert top.keys() == ckpt.top_state.keys() and all(torch.equal(top[k], v) for k, v in ckpt.top_state.items())


def test_a_finetuned_checkpoint_holds_only_the_head_and_its_top_blocks(lite0_tuned):
    backbone = build_backbone("efficientnet_lite0").module
    backbone_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    ckpt = load_checkpoint(lite0_tuned)
    top_bytes = sum(t.numel() * t.element_size() for t in ckpt.top_state.values())
    assert top_bytes == get_spec("efficientnet_lite0").top_bytes(2)  # the figure `backbones` shows
    size = lite0_tuned.stat().st_size
    assert top_bytes < size < top_bytes + 100_000 < backbone_bytes / 2, (size, top_bytes, backbone_bytes)


def test_a_checkpoint_from_before_fine_tuning_loads_as_before(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "frozen.pth")
    raw = torch.load(tmp_path / "frozen.pth", weights_only=True)
    assert "top_state" not in raw  # a frozen run's file is as it was
    torch.save({**raw, "config": _without(raw["config"], "finetune")}, tmp_path / "old.pth")
    old = load_checkpoint(tmp_path / "old.pth")
    assert old.top_state == {} and old.config.finetune == 0
    photo_path = make_image(tmp_path / "p.jpg", (200, 40, 90), size=(64, 48))
    a = predict(photo_path, load_model(tmp_path / "old.pth")[0], 3)
    b = predict(photo_path, load_model(tmp_path / "frozen.pth")[0], 3)
    assert a.probabilities == b.probabilities


def test_fine_tuned_weights_that_diverged_are_refused_at_save(tmp_path):
    path = finetuned_checkpoint(tmp_path / "t.pth", "tiny", 1)
    ckpt = load_checkpoint(path)
    ckpt.top_state["0.1.weight"][0] = float("inf")
    with pytest.raises(UserError, match=r"not saving .*'0.1.weight' are not all finite"):
        save_checkpoint(ckpt, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()
