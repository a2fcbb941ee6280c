"""A run stopped mid-epoch (SIGKILL, Ctrl-C, SIGTERM) and resumed ends exactly like an uninterrupted one."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, make_dataset, one_thread
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.cli import single_command_main

# The classic loop (images decoded and augmented every epoch), so that an epoch lasts about a second
# and a signal sent once epoch 1 is saved lands inside epoch 2; on cached features an epoch takes
# milliseconds and could end first. The cached path's resume is tested in test_features.py.
ARGS = ["--arch", "tiny", "--epochs", "3", "--hidden_units", "16", "--batch_size", "8", "--seed", "3", "--quiet",
        "--classic"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process runs below use one thread too


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume") / "d", ["1", "2", "3", "4"],
                        per_split={"train": 100, "valid": 10}, size=(96, 80))


def train_here(data, save_dir, *extra) -> int:
    with one_thread():
        return single_command_main("train", "train.py", [str(data), "--save_dir", str(save_dir), *ARGS, *extra])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference")
    assert train_here(data, save, "--workers", "0") == 0
    return load_checkpoint(save / "last.pth"), load_checkpoint(save / "checkpoint.pth")


def same_run(save_dir, reference) -> None:
    """last.pth and checkpoint.pth hold the reference's metrics and head weights, bit for bit."""
    for name, ref in zip(("last.pth", "checkpoint.pth"), reference):
        got = load_checkpoint(save_dir / name)
        assert got.epoch == ref.epoch
        drop_time = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
        assert drop_time(got.history) == drop_time(ref.history)
        assert all(torch.equal(got.head_state[k], v) for k, v in ref.head_state.items())


def stop_during_second_epoch(data, save_dir, workers: int, sig: int) -> subprocess.CompletedProcess:
    """Start train.py, wait for epoch 1's checkpoint, then send `sig` while epoch 2 runs. SIGINT goes
    to the whole process group, workers included, as Ctrl-C in a terminal does."""
    proc = subprocess.Popen([sys.executable, "train.py", str(data), "--save_dir", str(save_dir), *ARGS,
                             "--workers", str(workers)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (save_dir / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert load_checkpoint(save_dir / "last.pth").epoch == 1, (out, err)  # stopped during epoch 2
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 0), (signal.SIGKILL, 2), (signal.SIGINT, 2),
                                          (signal.SIGTERM, 0)], ids=["kill-w0", "kill-w2", "ctrl-c-w2", "term-w0"])
def test_stopped_and_resumed_run_ends_like_an_uninterrupted_one(data, reference, tmp_path, capsys, sig, workers):
    save = tmp_path / "ck"
    stopped = stop_during_second_epoch(data, save, workers, sig)
    if sig == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
    else:  # Ctrl-C and SIGTERM: what finished is saved, the way on is printed, no traceback
        assert stopped.returncode == 130
        assert f"interrupted: epochs 1-1 are saved in {save}; continue with the same command plus --resume" \
            in stopped.stdout
        assert stopped.stderr.strip() == ""  # said once, on stdout with the rest of the log
    assert train_here(data, save, "--workers", str(workers), "--resume") == 0
    out = capsys.readouterr().out
    assert f"Resuming from {save / 'last.pth'} after epoch 1" in out and "Epoch 1/3" not in out
    same_run(save, reference)


def test_stop_between_the_state_and_checkpoint_saves_still_resumes(data, reference, tmp_path):
    """The state file is written first and holds the head: a last.pth one epoch behind is no obstacle."""
    save = tmp_path / "ck"
    assert train_here(data, save, "--workers", "0", "--epochs", "1") == 0
    shutil.copy(save / "last.pth", tmp_path / "last_epoch1.pth")
    assert train_here(data, save, "--workers", "0", "--epochs", "2", "--resume") == 0
    shutil.copy(tmp_path / "last_epoch1.pth", save / "last.pth")  # as if stopped before last.pth was replaced
    assert train_here(data, save, "--workers", "0", "--resume") == 0
    same_run(save, reference)


def test_workers_do_not_change_the_run(data, reference, tmp_path):
    """Augmentation is seeded per image from (seed, epoch, index), not by worker processes."""
    assert train_here(data, tmp_path, "--workers", "2") == 0
    same_run(tmp_path, reference)


def test_interrupt_before_any_epoch_says_nothing_is_saved(tmp_path, monkeypatch):
    from flower_classifier import training
    from flower_classifier.config import TrainConfig

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit", interrupted)
    data = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1, "valid": 1})
    lines = []
    with pytest.raises(KeyboardInterrupt):
        training.run_training(TrainConfig(arch="tiny", num_workers=0), data, save_dir=tmp_path / "ck",
                              log=lines.append, progress=False)
    assert lines[-1] == "interrupted: no epoch had finished, so nothing is saved; run the same command again"


# ---------------------------------------------------------------- the cached path

CACHED = ["--arch", "tiny", "--hidden_units", "16", "--batch_size", "8", "--seed", "3", "--quiet", "--workers", "0",
          "--no_augment"]


@pytest.fixture
def small(tmp_path):
    return make_dataset(tmp_path / "d", ["1", "2", "3"], per_split={"train": 4, "valid": 2})


def test_a_run_resumes_on_the_other_engine_each_with_its_own_cache(small, tmp_path, capsys):
    """A CPU run (ONNX Runtime) resumed where PyTorch runs the feature pass (as on CUDA): the head
    does not care, and the two engines' features are stored apart."""
    save, cache = tmp_path / "ck", tmp_path / "cache"
    common = [str(small), "--save_dir", str(save), "--cache_dir", str(cache), *CACHED]
    with one_thread():
        assert single_command_main("train", "train.py", [*common, "--epochs", "1", "--engine", "onnx"]) == 0
        assert load_checkpoint(save / "last.pth").config.engine == "onnx"
        assert single_command_main("train", "train.py", [*common, "--epochs", "2", "--engine", "torch",
                                                         "--resume"]) == 0
    last = load_checkpoint(save / "last.pth")
    assert last.epoch == 2 and len(last.history) == 2 and last.config.engine == "torch"
    views = sorted(p.name.split("-")[1] for p in cache.glob("*/centre-*"))
    assert views == ["fp32", "onnx"], views  # centre-fp32-..., centre-onnx-fp32-...
    with one_thread():  # other options still may not change
        assert single_command_main("train", "train.py", [*common, "--epochs", "3", "--hidden_units", "8",
                                                         "--resume"]) == 2
    assert "hidden_units" in capsys.readouterr().err


def test_a_resumed_run_says_saved_only_for_a_best_epoch_it_trained(small, tmp_path, capsys):
    save = tmp_path / "ck"
    common = [str(small), "--save_dir", str(save), "--cache_dir", str(tmp_path / "cache"), *CACHED,
              "--learning_rate", "1e-9"]  # steps too small to move the validation accuracy: epoch 1 stays best
    with one_thread():
        assert single_command_main("train", "train.py", [*common, "--epochs", "1"]) == 0
        assert "Best epoch 1: valid accuracy" in capsys.readouterr().out
        assert single_command_main("train", "train.py", [*common, "--epochs", "2", "--resume"]) == 0
        [kept] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Best epoch")]
        assert load_checkpoint(save / "checkpoint.pth").epoch == 1 and load_checkpoint(save / "last.pth").epoch == 2
        assert kept.startswith("Best epoch 1:") and " Kept in " in kept and "Saved" not in kept, kept
        fresh = [*common[:2], str(tmp_path / "ck2"), *common[3:], "--epochs", "2"]
        assert single_command_main("train", "train.py", fresh) == 0  # trained in this call: saved
        [saved] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Best epoch")]
        assert saved.startswith("Best epoch 1:") and " Saved " in saved, saved
