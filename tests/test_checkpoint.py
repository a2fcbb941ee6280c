import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flower_classifier import checkpoint as ckpt_io
from flower_classifier.backbones import Preprocessing, build_backbone
from flower_classifier.checkpoint import Checkpoint, build_model, load_checkpoint, load_model, save_checkpoint
from flower_classifier.config import TrainConfig
from flower_classifier.errors import UserError
from flower_classifier.model import build_head
from flower_classifier.predictor import predict

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

def save_state(path, epoch=1):
    head = build_head(16, (8,), 12, 0.0)
    optimizer = torch.optim.AdamW(head.parameters())
    ckpt_io.save_training_state(path, epoch=epoch, optimizer_state=optimizer.state_dict(),
                                history=[{"epoch": epoch}], best_metric=0.5, head_state=head.state_dict())


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
