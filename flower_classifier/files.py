"""Writing a file so that readers see the old version or the new one, never half of the new one
(`atomic_write`, `atomic_save`), reading a torch file as plain data only (`safe_load`), and the one
rule for what a path a user names may be: read only if it is a regular file (`special_kind`), written
only where nothing of value is replaced (`check_output`, `check_output_folder`, `check_rewrite`)."""
from __future__ import annotations

import errno
import os
import pickle
import re
import stat
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


# ---------------------------------------------------------------- what a named path may be

OVERWRITE = "--overwrite"  # the flag of every command that writes a file the user names
_SPECIAL = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
            stat.S_IFSOCK: "a socket"}
_CHECKPOINT_SUFFIXES = {".pth", ".pt", ".ckpt"}


def special_kind(path: str | Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder ("a named pipe
    (FIFO)", "a device", "a socket"), else None. Only stat()ed: opening a FIFO to read blocks until
    someone writes to it, and a device such as /dev/zero never ends."""
    if not isinstance(path, (str, os.PathLike)):  # os.stat(3) would describe file descriptor 3
        return None
    try:
        return _SPECIAL.get(stat.S_IFMT(os.stat(path).st_mode))
    except (OSError, ValueError):  # missing, a loop of links, a NUL in the name: the reader says so
        return None


def check_regular_file(path: str | Path, what: str) -> Path:
    """`path` for reading, or a UserError when it is a FIFO, device or socket (never opened)."""
    kind = special_kind(path)
    if kind:
        raise UserError(f"{what} {path} is {kind}, not a file; pass a regular file")
    return Path(path)


def is_checkpoint(path: Path) -> bool:
    """Whether `path` looks like a PyTorch file (by its name, or torch.save's zip or pickle start)."""
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return True
    start = head(path, 64)
    return start.startswith(b"\x80") or (start.startswith(b"PK\x03\x04") and b"/data.pkl" in start)


def head(path: Path, size: int = 4096) -> bytes:
    """The first `size` bytes of a regular file; b"" for anything else (a FIFO is never opened)."""
    if special_kind(path):
        return b""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _refuse(option: str | None, path: Path, why: str):
    raise UserError(f"{option + ' ' if option else ''}{path}: {why}")


def _check_writable_folder(folder: Path, option: str | None, path: Path) -> None:
    """A file can be created in `folder` (tried, then removed: permissions, a read-only disk, root)."""
    if not folder.is_dir():
        _refuse(option, path, f"folder {folder} " + ("is not a folder" if folder.exists() else "does not exist") +
                "; create it or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        _refuse(option, path, f"folder {folder} is not writable; choose another place")
    try:  # permissions say yes: try it (a read-only disk, or root, whom permissions never stop)
        fd, probe = tempfile.mkstemp(prefix=f".write-test.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _refuse(option, path, f"folder {folder} is not writable ({e.strerror or e}); choose another place")


def check_output(path: str | Path, *, option: str | None = None, inputs=(), overwrite: bool = False,
                 ours: Callable[[Path], bool] | None = None, example: str | None = None) -> Path:
    """Where a command will write a file the user named, checked before any work; UserError otherwise.

    Never replaced: an input of the same command (`inputs`, compared as files, so a hard link or
    another spelling counts), a checkpoint, a link, a folder, a FIFO or device. An existing file
    only with `overwrite`, or when `ours(path)` recognises an earlier output of this kind. The folder
    must exist and take a new file. `example`: a file name to suggest when `path` is a folder.
    """
    path = Path(path)
    if path.is_symlink():
        _refuse(option, path, "is a symbolic link; an output never replaces one: name a file")
    if path.is_dir():
        _refuse(option, path, "is a folder; pass a file name" + (f", e.g. {path / example}" if example else ""))
    if path.exists():
        kind = special_kind(path)
        if kind:
            _refuse(option, path, f"is {kind}; an output is only written to a regular file")
        st = path.stat()
        for source in inputs:
            try:
                same = os.path.samestat(st, os.stat(source))
            except (OSError, ValueError):
                continue
            if same:
                _refuse(option, path, f"is {source}, an input of this command; write the output elsewhere")
        if is_checkpoint(path):
            _refuse(option, path, "is a checkpoint; an output never replaces one: choose another name")
        if not overwrite and not (ours is not None and ours(path)):
            _refuse(option, path, f"already exists; pass {OVERWRITE} to replace it, or choose another name")
    _check_writable_folder(path.parent, option, path)
    return path


def check_output_folder(folder: str | Path, names, *, option: str | None = None, inputs=(),
                        overwrite: bool = False, ours: Callable[[Path], bool] | None = None) -> Path:
    """A folder a command writes the files `names` into, checked before any work: a folder (or one
    that can be made), where each of those files passes `check_output`. `ours(folder)`: the folder
    holds an earlier output of this kind, whose files may be replaced."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        _refuse(option, folder, "is a file; pass a folder to write into")
    if not folder.exists():
        existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
        _check_writable_folder(existing, option, folder)
        return folder
    earlier = ours is not None and ours(folder)
    for name in names:
        check_output(folder / name, option=option, inputs=inputs, overwrite=overwrite or earlier)
    _check_writable_folder(folder, option, folder)
    return folder


def check_rewrite(path: str | Path, *, what: str = "checkpoint") -> Path:
    """The file a command rewrites in place (calibrate's checkpoint), checked before any work: a
    regular file in a folder that takes a new file. Returns its real path: through a link, the file
    it names is rewritten and the link kept."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if real.exists() and not real.is_file():
        _refuse(what, path, f"is {special_kind(real) or 'a folder'}, not a file")
    if real.is_file():
        _check_writable_folder(real.parent, what, path)
    return real


class WriteError(UserError, OSError):
    """Writing a file failed (a full disk, a lost permission): one line at the command line (a
    UserError), and still an OSError for code that handles those (a feature cache, a run folder)."""

    def __init__(self, path: Path, cause: OSError):
        OSError.__init__(self, cause.errno, cause.strerror or str(cause), str(path))
        self.message = f"could not write {path} ({cause.strerror or cause}); any earlier version of it is unchanged"

    def __str__(self) -> str:
        return self.message


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, sync it, then rename it over `path`.

    A crash, a full disk or a kill leaves the previous file whole; the next write of the same path
    removes the stray `.NAME.<pid>.*.tmp` a killed writer left. A failed write is a `WriteError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid in the name tells a stray file from one being written right now.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    remove_stale_temp_files(path)
    return path


class _Sink:
    """A file that remembers the error its write raised: torch.save's zip writer swallows it and
    raises RuntimeError("unexpected pos ...") instead."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file.
    A full disk is a `WriteError` (an OSError), as for any other file."""
    import torch  # here, so that the torch-free modules can use atomic_write

    def save(f: BinaryIO) -> None:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError as e:
            if sink.error is not None:
                raise sink.error from None
            if "unexpected pos" in str(e):  # a short write without an error: the disk ran out
                raise OSError(errno.ENOSPC, "the file could not be written in full; is the disk full?") from None
            raise

    return atomic_write(path, save)


def check_file(path: str | Path, what: str, *, example: str | None = None, fix: str | None = None) -> Path:
    """`path` as a Path if it names a file, else one UserError calling it `what`: a folder (with
    `example`, the file in it to suggest), a FIFO or device (never opened), or nothing there (`fix`:
    what to do). Torch-free, so that a command refuses a wrong path before it loads anything."""
    path = check_regular_file(path, what)
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
