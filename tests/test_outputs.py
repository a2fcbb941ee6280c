"""Paths a user names: an output never replaces an input, a checkpoint, a link, a FIFO, a device or
(without --overwrite) a stranger's file, and an unwritable place is one line before any work; a
FIFO or device given to read is refused without being opened; a full disk while saving a
checkpoint is one line and leaves the previous one whole."""
import errno
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from app_models import photo, tiny_models
from conftest import ROOT
from flower_classifier import files
from flower_classifier.checkpoint import load_checkpoint, save_checkpoint
from flower_classifier.cli import main, single_command_main
from flower_classifier.errors import UserError

FIFO = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("outputs"))


@pytest.fixture
def daisy(tmp_path):
    return shutil.copy(photo("daisy.jpg"), tmp_path / "daisy.jpg")


def predict(*argv):
    return single_command_main("predict", "predict.py", [str(a) for a in argv])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(path):
    """What must not change at `path`: its kind, its link target, its bytes."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_fifo() or path.is_char_device():
        return ("special", path.stat().st_ino)
    return ("file", path.read_bytes())


# ---------------------------------------------------------------- predict --csv

@pytest.mark.parametrize("target, why", [
    ("photo", "an input of this command"),
    ("hard_link", "an input of this command"),
    ("checkpoint", "an input of this command"),
    ("other_checkpoint", "is a checkpoint"),
    ("symlink", "symbolic link"),
    ("stranger", "already exists; pass --overwrite"),
    ("fifo", "named pipe"),
])
def test_csv_never_replaces_what_it_must_not(models, daisy, tmp_path, capsys, target, why):
    if target == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    checkpoint = shutil.copy(models["pytorch"], tmp_path / "model.pth")
    path = {"photo": daisy, "checkpoint": checkpoint}.get(target, tmp_path / f"{target}.csv")
    if target == "hard_link":
        os.link(daisy, path)
    elif target == "other_checkpoint":
        shutil.copy(models["pytorch"], path)  # a checkpoint, whatever its name
    elif target == "symlink":
        (tmp_path / "elsewhere.txt").write_text("keep me")
        path.symlink_to(tmp_path / "elsewhere.txt")
    elif target == "stranger":
        path.write_text("my own notes\n")
    elif target == "fifo":
        os.mkfifo(path)
    before = snapshot(path)
    assert predict(daisy, checkpoint, "--csv", path) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --csv {path}") and why in line
    assert snapshot(path) == before


def test_csv_onto_a_device_is_refused(models, daisy, tmp_path, capsys):
    """On a null device node of the test's own (never the system's /dev/null: without the check,
    the output would replace it with a regular file)."""
    import stat

    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (OSError, AttributeError):
        pytest.skip("making a device node needs root")
    assert predict(daisy, models["onnx"], "--csv", device) == 2
    assert "is a device" in one_error_line(capsys)
    assert device.is_char_device()


def test_csv_replaces_its_own_table_and_a_stranger_only_with_overwrite(models, daisy, tmp_path, capsys):
    table = tmp_path / "out.csv"
    assert predict(daisy, models["onnx"], "--csv", table) == 0
    first = table.read_text()
    assert predict(daisy, models["onnx"], "--csv", table, "--top_k", "2") == 0  # an earlier table: replaced
    assert table.read_text() != first and table.read_text().startswith("path,")
    stranger = tmp_path / "notes.csv"
    stranger.write_text("name,phone\n")
    assert predict(daisy, models["onnx"], "--csv", stranger, "--overwrite") == 0
    assert stranger.read_text().startswith("path,")


def test_an_unwritable_folder_is_one_line_before_any_work(models, daisy, tmp_path, capsys, monkeypatch):
    """The folder is tried with a real temporary file (permissions, a read-only disk, even as root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    real = files.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if str(dir) == str(folder):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr("flower_classifier.predictor.load_predictor",
                        lambda *a, **k: pytest.fail("the model was loaded before the output was checked"))
    assert predict(daisy, models["onnx"], "--csv", folder / "out.csv") == 2
    assert "is not writable (Permission denied)" in one_error_line(capsys)


# ---------------------------------------------------------------- export, report, search, calibrate

def test_export_refuses_its_checkpoint_strangers_and_unwritable_places(models, tmp_path, capsys):
    checkpoint = shutil.copy(models["pytorch"], tmp_path / "model.pth")
    disguised = shutil.copy(models["pytorch"], tmp_path / "weights.onnx")  # a checkpoint named .onnx
    stranger = tmp_path / "someone_elses.onnx"
    stranger.write_bytes(b"\x08\x07\x12\x04onnx other producer")
    for out, why in ((disguised, "is a checkpoint"), (stranger, "already exists; pass --overwrite"),
                     (tmp_path / "nowhere" / "m.onnx", "does not exist"), (tmp_path, "is a folder")):
        before = snapshot(out) if out.is_file() else None
        assert main(["export", str(checkpoint), str(out)]) == 2
        assert why in one_error_line(capsys), out
        assert before is None or snapshot(out) == before
    earlier = shutil.copy(models["onnx"], tmp_path / "earlier.onnx")  # an earlier export: replaced
    assert main(["export", str(checkpoint), str(earlier)]) == 0
    assert main(["export", str(checkpoint), str(stranger), "--overwrite"]) == 0
    capsys.readouterr()


def test_report_out_onto_a_file_or_a_strangers_folder(models, tmp_path, capsys):
    from conftest import make_dataset

    split = make_dataset(tmp_path / "d", [str(i) for i in range(1, 6)], per_split={"valid": 1}) / "valid"
    file = tmp_path / "a_file"
    file.write_text("mine")
    assert main(["report", str(models["pytorch"]), str(split), "--out", str(file), "--workers", "0"]) == 2
    assert "is a file; pass a folder" in one_error_line(capsys) and file.read_text() == "mine"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "report.txt").write_text("my own report, not this program's\n")
    assert main(["report", str(models["pytorch"]), str(split), "--out", str(folder), "--workers", "0"]) == 2
    assert "already exists; pass --overwrite" in one_error_line(capsys)
    assert (folder / "report.txt").read_text().startswith("my own report")
    out = tmp_path / "report"
    for _ in range(2):  # the second run replaces the first's files: its own earlier report
        assert main(["report", str(models["pytorch"]), str(split), "--out", str(out), "--workers", "0"]) == 0
    assert (out / "report.txt").read_text().startswith("accuracy ")
    capsys.readouterr()


def test_search_out_never_replaces_a_checkpoint(models, tmp_path, capsys):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "d", ["1", "2"], per_split={"train": 1, "valid": 1})
    checkpoint = shutil.copy(models["pytorch"], tmp_path / "model.pth")
    before = checkpoint.read_bytes()
    assert main(["search", str(data), "--out", str(checkpoint), "--arch", "tiny", "--trials", "1"]) == 2
    assert "is a checkpoint" in one_error_line(capsys) and checkpoint.read_bytes() == before


def test_calibrate_checks_its_folder_before_any_work(models, tmp_path, capsys, monkeypatch):
    checkpoint = shutil.copy(models["pytorch"], tmp_path / "model.pth")
    monkeypatch.setattr(files.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    monkeypatch.setattr("flower_classifier.checkpoint.load_checkpoint",
                        lambda *a, **k: pytest.fail("calibrate did its work before checking it could save"))
    assert main(["calibrate", str(checkpoint), str(tmp_path / "data")]) == 2
    assert "Read-only file system" in one_error_line(capsys)


def test_calibrate_through_a_link_rewrites_the_file_and_keeps_the_link(models, tmp_path):
    real = shutil.copy(models["pytorch"], tmp_path / "real.pth")
    link = tmp_path / "link.pth"
    link.symlink_to(real)
    assert files.check_rewrite(link) == real.resolve()


# ---------------------------------------------------------------- FIFOs and devices given to read

@FIFO
@pytest.mark.parametrize("role", ["photo", "checkpoint", "onnx", "names"])
def test_a_fifo_to_read_is_one_line_not_a_hang(models, daisy, tmp_path, role):
    """In a subprocess with a timeout: without the check, opening the FIFO blocks for ever."""
    fifo = tmp_path / {"photo": "photo.jpg", "checkpoint": "model.pth", "onnx": "model.onnx",
                       "names": "names.json"}[role]
    os.mkfifo(fifo)
    argv = {"photo": [fifo, models["onnx"]], "checkpoint": [daisy, fifo], "onnx": [daisy, fifo],
            "names": [daisy, models["onnx"], "--category_names", fifo]}[role]
    result = subprocess.run([sys.executable, "predict.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert "named pipe (FIFO)" in err[0] and str(fifo) in err[0]


@FIFO
def test_decode_image_and_safe_load_never_open_a_fifo(tmp_path):
    from flower_classifier.images import decode_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def unblock():  # should a reader open it, a writer comes after 10 s, so that the test fails, not hangs
        if not done.wait(10):
            os.close(os.open(fifo, os.O_WRONLY))

    done = threading.Event()
    threading.Thread(target=unblock, daemon=True).start()
    try:
        with pytest.raises(UserError, match="named pipe"):
            decode_image(fifo)
        with pytest.raises(UserError, match="named pipe"):
            files.safe_load(fifo)
    finally:
        done.set()


# ---------------------------------------------------------------- a full disk while saving

class FullDisk:
    """A file whose disk fills up after `room` bytes, as os.fdopen would return it."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(models, tmp_path, monkeypatch):
    """torch.save's zip writer turns the disk's OSError into RuntimeError("unexpected pos"): the real
    torch.save runs here, on a file that fills up."""
    path = shutil.copy(models["pytorch"], tmp_path / "checkpoint.pth")
    before = path.read_bytes()
    ckpt = load_checkpoint(path)
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode), room=2000))
    with pytest.raises(UserError) as caught:
        save_checkpoint(ckpt, path)
    assert isinstance(caught.value, OSError)  # a run folder's save still catches it as a full disk
    assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setattr(os, "fdopen", real)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]
    after = load_checkpoint(path).head_state
    assert after.keys() == ckpt.head_state.keys() and all(torch.equal(after[k], ckpt.head_state[k]) for k in after)
