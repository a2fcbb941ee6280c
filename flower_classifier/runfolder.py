"""A training run's folder (`--save_dir`): the files in it, saving an epoch, resuming, and the lock
that keeps two runs from writing into it at once.

    checkpoint.pth   the best epoch by validation accuracy: what predict.py loads; calibrated once
                     the epochs are done (until then it holds no calibration)
    last.pth         the latest finished epoch, uncalibrated: what --resume continues
    last.state.pth   the latest epoch's head (and fine-tuned blocks), optimizer and schedule state and
                     history: what --resume continues
    train.lock       held while a run writes here: its process id, machine and start time
    history.csv, training_curves.png, MODEL_CARD.md
                     the run's record, written at its end (see `record`); the run is done when
                     checkpoint.pth is calibrated and these are written (`unfinished`)

Each run draws a random id, written into all three files and kept by --resume, so that files of two
runs are never taken for one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import BEST_NAME, Checkpoint, check_head, check_top, load_checkpoint, load_training_state, \
    save_checkpoint, save_training_state
from .config import TrainConfig
from .errors import UserError
from .files import pid_alive

LAST_NAME = "last.pth"
STATE_NAME = "last.state.pth"
LOCK_NAME = "train.lock"
HISTORY_NAME = "history.csv"
CURVES_NAME = "training_curves.png"
CARD_NAME = "MODEL_CARD.md"

# Options that leave the trained weights alone. engine: its features equal the other's to 1e-4, and each
# engine has its own files in the cache (the precision, onnx-fp32 or fp32, is part of a view's key).
# patience: when to stop, not how to train.
RESUME_MAY_CHANGE = ("epochs", "num_workers", "extra", "unknown_score", "keep", "engine", "patience")


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block takes effect when it ends, so that an epoch's files
    and the run's record of them are written together: a stop never lands between the save of
    last.pth and the note that the epoch is saved. Only the main thread can set signal handlers;
    elsewhere the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.signal(sig, lambda sig, _frame: caught.append(sig)) for sig in kinds}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if caught:  # delivered again, now, to whatever handled it before (a KeyboardInterrupt, say)
            os.kill(os.getpid(), caught[0])


def new_run_id() -> str:
    return secrets.token_hex(8)


# ---------------------------------------------------------------- resuming

@dataclass
class Resumed:
    """What --resume continues: the last checkpoint (for the run's metadata) and its training state."""

    path: Path  # the last.pth
    last: Checkpoint
    state: dict  # `checkpoint.load_training_state`'s fields: epoch, head_state, optimizer, history, ...


def check_resumable(ckpt: Checkpoint, config: TrainConfig, classes: list[str], path: Path) -> None:
    """A resumed run must be the same run: same categories and every option but --epochs/--workers."""
    saved, now = ckpt.config.to_dict(), config.to_dict()
    changed = [f"{k} {now.get(k)!r} (saved run: {v!r})" for k, v in saved.items()
               if k not in RESUME_MAY_CHANGE and now.get(k) != v]
    if ckpt.classes != classes:
        changed.append(f"categories ({len(classes)} here, {len(ckpt.classes)} in the saved run)")
    if changed:
        raise UserError(f"cannot resume from {path}: this run differs in {'; '.join(changed)}; "
                        f"use the saved run's options or a new --save_dir")


def load_resume(path: str | Path, config: TrainConfig, classes: list[str]) -> Resumed:
    """The last checkpoint and its training state, after checking that they belong together (one
    run, adjacent epochs, a head of the right shape) and that this run's options match the saved run's."""
    path = Path(path)
    if path.is_dir() or not path.suffix:  # a --save_dir, even one that does not exist
        path = path / LAST_NAME
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist; train without --resume first, "
                        f"or pass the {LAST_NAME} to continue from")
    last = load_checkpoint(path)
    check_resumable(last, config, classes, path)
    state_path = path.with_name(STATE_NAME)
    if not state_path.is_file():
        raise UserError(f"cannot resume from {path}: its training state {state_path} is missing (every epoch "
                        f"writes it); train again without --resume, or into a new --save_dir")
    state = load_training_state(state_path)
    if state["run_id"] != last.run_id:
        raise UserError(f"cannot resume: {state_path} and {path} come from different runs (run ids "
                        f"{state['run_id']} and {last.run_id}); resume from a folder one run wrote")
    # The state is written before last.pth, so a stop in between leaves it one epoch ahead.
    if state["epoch"] not in (last.epoch, last.epoch + 1) or len(state["history"]) != state["epoch"]:
        raise UserError(f"cannot resume: {state_path} (epoch {state['epoch']}, {len(state['history'])} epochs of "
                        f"history) does not follow {path} (epoch {last.epoch}); resume from a folder one run wrote")
    check_head(state["head_state"], arch=last.arch, hidden_units=last.config.hidden_units,
               num_classes=len(last.classes), where=str(state_path))
    check_top(state["top_state"], arch=last.arch, finetune=last.config.finetune, where=str(state_path))
    return Resumed(path, last, state)


# ---------------------------------------------------------------- the folder

class RunFolder:
    """The files of one save folder, and the run that holds its lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.best, self.last = self.path / BEST_NAME, self.path / LAST_NAME
        self.state, self.lock = self.path / STATE_NAME, self.path / LOCK_NAME
        self.history, self.curves, self.card = self.path / HISTORY_NAME, self.path / CURVES_NAME, self.path / CARD_NAME

    def check_writable(self) -> None:
        """A --save_dir that cannot hold checkpoints is refused now, not after the first epoch's work."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--save_dir {self.path} is a file; pass a folder for the checkpoints")
        if self.path.exists() and not os.access(self.path, os.W_OK | os.X_OK):
            raise UserError(f"--save_dir {self.path} is not writable; pass a folder you can write to")

    def unfinished(self, epochs: int) -> list[str]:
        """What a run that trained `epochs` epochs here still lacks, in words: the best checkpoint's
        calibration, and a record (history.csv with a row per epoch, then the model card, written last)."""
        missing = []
        if not self.best.is_file() or load_checkpoint(self.best).calibration is None:
            missing.append(f"calibrating {self.best.name}")
        try:
            rows = len(self.history.read_text().splitlines()) - 1
            written = rows == epochs and self.card.stat().st_mtime >= self.history.stat().st_mtime
        except OSError:
            written = False
        if not written:
            missing.append(f"writing its record ({self.history.name}, {self.card.name})")
        return missing

    # -- saving

    def save_epoch(self, snapshot: Checkpoint, *, improved: bool, optimizer_state: dict,
                   best_accuracy: float, scheduler_state: dict | None = None) -> None:
        """Write an epoch: best (if improved), then the training state, then last. The state holds the
        head too, so that a stop between these saves still resumes. A failed write (a full disk) leaves
        the previous files whole and ends the run in one line."""
        try:
            if improved:
                save_checkpoint(snapshot, self.best)
            save_training_state(self.state, epoch=snapshot.epoch, optimizer_state=optimizer_state,
                                history=snapshot.history, best_metric=best_accuracy,
                                head_state=snapshot.head_state, run_id=snapshot.run_id,
                                top_state=snapshot.top_state, scheduler_state=scheduler_state)
            save_checkpoint(snapshot, self.last)
        except OSError as e:
            kept = f"epochs 1-{snapshot.epoch - 1} stay saved there" if snapshot.epoch > 1 else "no epoch was saved"
            raise UserError(f"could not save epoch {snapshot.epoch} in {self.path} ({e.strerror or e}); {kept}: "
                            f"free some space, then run the same command plus --resume") from None

    def restore_best(self, resumed: Resumed, log: Callable[[str], None]) -> None:
        """A resumed run that finds checkpoint.pth gone rebuilds it from the saved epoch (last.pth or
        the training state's head) with the best validation accuracy, and says which."""
        if self.best.is_file():
            return
        history = resumed.state["history"]
        accuracy = lambda epoch: history[epoch - 1].get("valid_accuracy", -1.0)  # noqa: E731
        weights = {resumed.last.epoch: (resumed.last.head_state, resumed.last.top_state),
                   resumed.state["epoch"]: (resumed.state["head_state"], resumed.state["top_state"])}
        epoch = max(weights, key=lambda e: (accuracy(e), -e))
        best = max(range(1, len(history) + 1), key=lambda e: (accuracy(e), -e))
        save_checkpoint(dataclasses.replace(
            resumed.last, head_state=weights[epoch][0], top_state=weights[epoch][1], epoch=epoch, history=history[:epoch],
            metrics={k: v for k, v in history[epoch - 1].items() if k != "epoch"}), self.best)
        resumed.state["best_metric"] = accuracy(epoch)  # a later epoch that beats it replaces it
        if accuracy(epoch) >= accuracy(best):
            log(f"note: {self.best} was missing; rebuilt it from epoch {epoch}, the best so far")
        else:
            log(f"note: {self.best} was missing and the weights of epoch {best}, the best so far, are gone; it now "
                f"holds epoch {epoch} (valid accuracy {100 * accuracy(epoch):.1f}%), the best epoch still saved")

    # -- the lock

    @contextmanager
    def locked(self, log: Callable[[str], None]) -> Iterator["RunFolder"]:
        """Hold the folder's lock while the run lasts (released on any exit, Ctrl-C included). Creates
        the folder, and removes it again if the run leaves nothing in it (a refused run writes nothing)."""
        self.check_writable()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--save_dir {self.path}: cannot create it ({e.strerror}); "
                            f"pass a folder you can write to") from None
        try:
            try:
                mine = self._acquire(log)
            except OSError as e:  # a full disk, say
                raise UserError(f"--save_dir {self.path}: cannot write its lock file {self.lock.name} "
                                f"({e.strerror or e}); free some space or pass another --save_dir") from None
            try:
                yield self
            finally:
                self._release(mine)
        finally:
            if created and not any(self.path.iterdir()):
                self.path.rmdir()

    def _acquire(self, log) -> dict:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "process_start": _process_start(os.getpid())}
        for _ in range(5):
            if _create_exclusive(self.lock, json.dumps(mine)):
                return mine
            holder = _read_lock(self.lock)
            if holder is None:
                if self.lock.exists():
                    raise UserError(f"--save_dir {self.path} is locked by {self.lock}, which is not a lock this "
                                    f"project wrote; if no training run uses the folder, delete that file")
                continue  # released meanwhile: try again
            who = f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
            if _holder_runs(holder):
                raise UserError(f"--save_dir {self.path} is in use by another training run ({who}); wait for it to "
                                f"end or pass another --save_dir")
            if _remove_if_unchanged(self.lock, holder):
                log(f"note: taking over {self.lock}, left by {who}, which no longer runs")
        raise UserError(f"--save_dir {self.path}: other runs keep taking its lock {self.lock}; pass another --save_dir")

    def _release(self, mine: dict) -> None:
        if _read_lock(self.lock) == mine:  # never another run's lock
            self.lock.unlink(missing_ok=True)


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text`, unless it exists: written to a temporary file first, then linked
    into place (link, like O_EXCL, fails on an existing name), so no reader sees a half-written lock."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: O_EXCL, written just after creation
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink()


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("pid", "host", "started")
    return holder if isinstance(holder, dict) and all(k in holder for k in keys) and \
        isinstance(holder["pid"], int) else None


def _process_start(pid: int) -> str | None:
    """When a process started (Linux: clock ticks after boot), telling it from a later one that reuses its id."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_runs(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    if not pid_alive(holder["pid"]):
        return False
    started = _process_start(holder["pid"])
    return holder.get("process_start") is None or started is None or started == holder["process_start"]


def _remove_if_unchanged(path: Path, holder: dict) -> bool:
    """Remove a stale lock, unless another run replaced it since it was read (two runs taking over the
    same stale lock): moved aside first, and put back if it is no longer the stale one."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read_lock(aside) == holder:
        aside.unlink()
        return True
    try:
        os.link(aside, path)  # another run's fresh lock: give it back
    except FileExistsError:
        pass
    aside.unlink()
    return False
