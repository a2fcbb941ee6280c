"""Writing a file so that readers see the old version or the new one, never half of the new one
(`atomic_write`, `atomic_save`), and reading a torch file as plain data only (`safe_load`)."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove `.NAME.<pid>.*.tmp` files beside `path` left by writers that no longer run (a SIGKILL or
    power cut mid-save); a live writer's file is left alone."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, sync it, then rename it over `path`.

    A crash, a full disk or a kill leaves the previous file whole; the next write of the same path
    removes the stray `.NAME.<pid>.*.tmp` a killed writer left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name tells a stray file from one being written right now.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    remove_stale_temp_files(path)
    return path


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    import torch  # here, so that the torch-free modules can use atomic_write

    return atomic_write(path, lambda f: torch.save(obj, f))


def check_file(path: str | Path, what: str, *, example: str | None = None, fix: str | None = None) -> Path:
    """`path` as a Path if it names a file, else one UserError calling it `what`: a folder (with
    `example`, the file in it to suggest) or nothing there (`fix`: what to do). Torch-free, so that a
    command refuses a wrong path before it loads anything."""
    path = Path(path)
    if path.is_dir():
        inside = path / example if example else None
        raise UserError(f"{what} {path} is a folder; pass a file" +
                        (f" such as {inside}" if inside and inside.is_file() else " in it"))
    if not path.is_file():
        raise UserError(f"{what} {path} not found" + ("" if path.parent.is_dir() else
                        f" (folder {path.parent} does not exist)") + f"; {fix or 'train first or pass the right path'}")
    return path


def safe_load(path: str | Path, what: str = "checkpoint", *, example: str | None = None):
    """torch.load with weights_only=True, turning every failure into one clear UserError.
    `example`: the file to suggest when `path` is a folder (a run folder's checkpoint, say)."""
    import torch

    path = check_file(path, what, example=example)
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is an exported ONNX model; this command needs the .pth {what} it was exported "
                        f"from (predict.py and serve take .onnx files)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        if found:  # the file names a Python callable: loading it without weights_only could run code
            raise UserError(f"{path}: refused to load: it refers to {found.group(1)}, beyond plain data and "
                            f"tensors; only load checkpoints you trust, saved by this project") from None
        raise UserError(f"{path}: not a {what} of this project (not a PyTorch file of plain data)") from None
    except Exception as e:  # torch.load raises many kinds on a foreign file: all mean "not ours"
        raise UserError(f"{path}: not a {what} of this project (not a file torch.save wrote: "
                        f"{type(e).__name__})") from None
