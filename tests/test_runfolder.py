"""The run folder: one run at a time (the lock), files of one run only (the run id), a missing best
checkpoint rebuilt on --resume, a full disk or a diverging loss leaving the saved files whole."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, make_dataset
from flower_classifier import training
from flower_classifier.checkpoint import load_checkpoint, load_training_state
from flower_classifier.cli import single_command_main
from flower_classifier.errors import UserError
from flower_classifier.runfolder import BEST_NAME, CARD_NAME, CURVES_NAME, HISTORY_NAME, LAST_NAME, LOCK_NAME, \
    STATE_NAME, RunFolder

SMALL = ["--arch", "tiny", "--hidden_units", "8", "--batch_size", "4", "--workers", "0", "--quiet"]
FILES = (BEST_NAME, LAST_NAME, STATE_NAME)
RECORD = (HISTORY_NAME, CURVES_NAME, CARD_NAME)  # written when a run ends (`record`)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("runfolder") / "d", ["1", "2", "3"],
                        per_split={"train": 4, "valid": 2})


def train(data, save, *extra) -> int:
    return single_command_main("train", "train.py", [str(data), "--save_dir", str(save), *SMALL, *extra])


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in captured.err, err
    return err[0]


def contents(save) -> dict:
    return {name: (save / name).read_bytes() for name in FILES}


def no_backbone(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the backbone was built before the refusal")
    monkeypatch.setattr(training, "build_backbone", refuse)


# ---------------------------------------------------------------- the lock

def test_a_second_run_into_a_locked_folder_is_refused_naming_the_first(data, tmp_path, capsys, monkeypatch):
    save = tmp_path / "ck"
    with RunFolder(save).locked(print):
        lock = json.loads((save / LOCK_NAME).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname() and lock["started"]
        no_backbone(monkeypatch)
        assert train(data, save, "--epochs", "1") == 2
        line = one_error_line(capsys)
        assert f"--save_dir {save} is in use by another training run (process {os.getpid()} on " \
               f"{socket.gethostname()}, started {lock['started']})" in line
        assert list(save.iterdir()) == [save / LOCK_NAME]  # the refused run wrote nothing
    assert not save.exists()  # the lock went with the run that took it, and so did the empty folder


def test_the_lock_is_released_after_a_run_ends_well_or_badly(data, tmp_path, monkeypatch):
    save = tmp_path / "ck"
    assert train(data, save, "--epochs", "1") == 0
    assert sorted(p.name for p in save.iterdir()) == sorted(FILES + RECORD)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "fit", interrupted)
    assert train(data, save, "--epochs", "2", "--resume") == 130
    monkeypatch.setattr(training, "fit", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(data, save, "--epochs", "2", "--resume")
    assert not (save / LOCK_NAME).exists()


def test_a_lock_that_cannot_be_written_is_one_line(data, tmp_path, capsys, monkeypatch):
    from flower_classifier import runfolder

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runfolder, "_create_exclusive", disk_full)
    assert train(data, tmp_path / "ck", "--epochs", "1") == 2
    assert f"cannot write its lock file {LOCK_NAME} (No space left on device)" in one_error_line(capsys)
    assert not (tmp_path / "ck").exists()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_with_a_note(data, tmp_path, capsys):
    save = tmp_path / "ck"
    save.mkdir()
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (save / LOCK_NAME).write_text(json.dumps(stale))
    assert train(data, save, "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert f"note: taking over {save / LOCK_NAME}, left by process {stale['pid']} on {stale['host']}, started " \
           f"2026-01-01 00:00:00, which no longer runs" in out
    assert not (save / LOCK_NAME).exists()
    # A live process id that now belongs to another process (started later) is stale too.
    (save / LOCK_NAME).write_text(json.dumps({**stale, "pid": os.getppid(), "process_start": "1"}))
    assert train(data, save, "--epochs", "2", "--resume") == 0
    assert "which no longer runs" in capsys.readouterr().out


@pytest.mark.parametrize("lock, needle", [
    ({"pid": 1, "host": "another-machine", "started": "2026-01-01 00:00:00"},
     "in use by another training run (process 1 on another-machine"),
    ("not json", "not a lock this project wrote; if no training run uses the folder, delete that file"),
])
def test_locks_that_cannot_be_judged_stale_are_refused(data, tmp_path, capsys, lock, needle):
    save = tmp_path / "ck"
    save.mkdir()
    (save / LOCK_NAME).write_text(lock if isinstance(lock, str) else json.dumps(lock))
    assert train(data, save, "--epochs", "1") == 2
    assert needle in one_error_line(capsys)
    assert [p.name for p in save.iterdir()] == [LOCK_NAME]  # left as it was


def test_two_train_processes_into_one_folder_one_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d", ["1", "2", "3", "4"], per_split={"train": 60, "valid": 10}, size=(96, 80))
    save = tmp_path / "ck"
    command = [sys.executable, "train.py", str(data), "--save_dir", str(save), *SMALL, "--classic", "--epochs", "200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        [refused] = [p for p in procs if p.poll() is not None]
        [running] = [p for p in procs if p is not refused]
        out, err = refused.communicate()
        assert refused.returncode == 2, (out, err)
        assert err.strip().count("\n") == 0 and \
            f"is in use by another training run (process {running.pid} on {socket.gethostname()}" in err
        assert json.loads((save / LOCK_NAME).read_text())["pid"] == running.pid
        os.killpg(running.pid, signal.SIGINT)  # Ctrl-C: the lock goes with it
        running.communicate(timeout=60)
        assert running.returncode == 130
        assert not (save / LOCK_NAME).exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- the run id and --resume

def test_state_of_another_run_is_refused_before_any_feature_work(data, tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(data, a, "--epochs", "1") == 0 and train(data, b, "--epochs", "1") == 0
    run_a, run_b = load_checkpoint(a / LAST_NAME).run_id, load_checkpoint(b / LAST_NAME).run_id
    assert run_a and run_b and run_a != run_b  # random per run
    assert load_training_state(a / STATE_NAME)["run_id"] == run_a
    shutil.copy(b / STATE_NAME, a / STATE_NAME)
    no_backbone(monkeypatch)
    assert train(data, a, "--epochs", "2", "--resume") == 2
    line = one_error_line(capsys)
    assert f"{a / STATE_NAME} and {a / LAST_NAME} come from different runs (run ids {run_b} and {run_a})" in line


def test_a_resumed_run_keeps_its_id_and_a_state_far_from_last_is_refused(data, tmp_path, capsys, monkeypatch):
    save = tmp_path / "ck"
    assert train(data, save, "--epochs", "1") == 0
    shutil.copy(save / LAST_NAME, tmp_path / "epoch1.pth")
    assert train(data, save, "--epochs", "3", "--resume") == 0
    run_id = load_checkpoint(tmp_path / "epoch1.pth").run_id
    assert {load_checkpoint(save / n).run_id for n in (LAST_NAME, BEST_NAME)} == {run_id}
    shutil.copy(tmp_path / "epoch1.pth", save / LAST_NAME)  # epoch 1 beside a state of epoch 3
    no_backbone(monkeypatch)
    assert train(data, save, "--epochs", "4", "--resume") == 2
    assert "(epoch 3, 3 epochs of history) does not follow" in one_error_line(capsys)
    (save / STATE_NAME).unlink()
    assert train(data, save, "--epochs", "4", "--resume") == 2
    assert f"its training state {save / STATE_NAME} is missing" in one_error_line(capsys)


@pytest.mark.parametrize("more_epochs", [True, False], ids=["goes-on", "already-finished"])
def test_a_missing_best_checkpoint_is_rebuilt_on_resume(data, tmp_path, capsys, more_epochs):
    save = tmp_path / "ck"
    assert train(data, save, "--epochs", "2") == 0
    history = load_checkpoint(save / LAST_NAME).history
    (save / BEST_NAME).unlink()
    capsys.readouterr()
    assert train(data, save, "--epochs", "3" if more_epochs else "2", "--resume") == 0
    out = capsys.readouterr().out
    [note] = [line for line in out.splitlines() if line.startswith("note:")]
    assert f"{save / BEST_NAME} was missing" in note
    best = load_checkpoint(save / BEST_NAME)
    final = load_checkpoint(save / LAST_NAME).history
    assert best.metrics["valid_accuracy"] == max(h["valid_accuracy"] for h in final[:best.epoch])
    if not more_epochs:  # nothing trained: last.pth and the state hold epoch 2, the one left to rebuild from
        assert best.epoch == 2
        top = max(h["valid_accuracy"] for h in history)
        if history[1]["valid_accuracy"] == top:
            assert note.endswith("rebuilt it from epoch 2, the best so far")
        else:
            assert "the weights of epoch 1, the best so far, are gone; it now holds epoch 2" in note


# ---------------------------------------------------------------- a full disk, a diverging loss

def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_files(data, tmp_path, capsys, monkeypatch):
    save = tmp_path / "ck"
    assert train(data, save, "--epochs", "1") == 0
    before = contents(save)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert train(data, save, "--epochs", "2", "--resume") == 2
    line = one_error_line(capsys)
    assert f"could not save epoch 2 in {save} (No space left on device); epochs 1-1 stay saved there" in line
    assert "--resume" in line
    assert contents(save) == before and sorted(p.name for p in save.iterdir()) == sorted(FILES + RECORD)
    monkeypatch.setattr(torch, "save", real_save)
    assert train(data, save, "--epochs", "2", "--resume") == 0  # space freed: it goes on
    assert load_checkpoint(save / LAST_NAME).epoch == 2


def test_a_non_finite_loss_stops_the_run_and_keeps_the_saved_epochs(data, tmp_path, capsys, monkeypatch):
    save = tmp_path / "ck"
    assert train(data, save, "--epochs", "1", "--learning_rate", "0.5") == 0
    before = contents(save)
    real_loss = torch.nn.CrossEntropyLoss

    class DivergesInEpoch2(real_loss):
        def forward(self, logits, targets):
            loss = super().forward(logits, targets)
            return loss * float("nan") if self.training and torch.is_grad_enabled() else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", DivergesInEpoch2)
    capsys.readouterr()
    assert train(data, save, "--epochs", "3", "--resume", "--learning_rate", "0.5") == 2
    line = one_error_line(capsys)
    assert "epoch 2/3 train: the loss became nan (not a finite number), so training stopped" in line
    assert "the learning rate 0.5 is likely too high (try --learning_rate 0.05)" in line and "data" in line
    assert contents(save) == before and not (save / LOCK_NAME).exists()


def test_a_loss_that_blows_up_is_caught_by_the_python_api_too(data, tmp_path):
    """Every option is range-checked, so no setting a user can give makes the loss blow up at once;
    broken data still can: a backbone whose features overflow float32, as a stand-in."""
    import dataclasses

    from torch import nn

    from flower_classifier.backbones import build_backbone, freeze
    from flower_classifier.config import TrainConfig

    class Huge(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images) * 1e38 * 1e38  # past float32: features overflow to inf

    tiny = build_backbone("tiny")
    huge = dataclasses.replace(tiny, module=freeze(Huge(tiny.module)))
    config = TrainConfig(arch="tiny", hidden_units=(8,), batch_size=4, epochs=3, num_workers=0, dropout=0.0,
                         feature_cache=False)
    with pytest.raises(UserError, match="the loss became (nan|inf)"):
        training.run_training(config, data, save_dir=tmp_path / "ck", backbone=huge, log=lambda m: None,
                              progress=False)
    assert not any((tmp_path / "ck" / name).exists() for name in FILES)  # it stopped before any save


# ---------------------------------------------------------------- Ctrl-C while an epoch is saved

def test_ctrl_c_while_an_epoch_is_saved_takes_effect_once_it_is_saved(data, tmp_path, capsys, monkeypatch):
    """A stop that lands between the write of last.pth and the run's note that the epoch is saved
    must neither lose the epoch nor say that nothing was saved (it did, under load)."""
    save = tmp_path / "ck"
    real_save = RunFolder.save_epoch

    def save_then_ctrl_c(self, snapshot, **kw):
        real_save(self, snapshot, **kw)
        if snapshot.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the files are written

    monkeypatch.setattr(RunFolder, "save_epoch", save_then_ctrl_c)
    assert train(data, save, "--epochs", "3") == 130
    out = capsys.readouterr().out
    assert f"interrupted: epochs 1-1 are saved in {save}" in out, out
    assert load_checkpoint(save / LAST_NAME).epoch == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    monkeypatch.undo()
    assert train(data, save, "--epochs", "3", "--resume") == 0
    assert load_checkpoint(save / LAST_NAME).epoch == 3
