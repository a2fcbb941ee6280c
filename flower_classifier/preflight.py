"""What `training.run_training` checks before any work (weights downloaded, features computed):
the save folder and that a resumed run is the run that was started."""
from __future__ import annotations

import os
from pathlib import Path

from . import checkpoint as ckpt_io
from .checkpoint import Checkpoint
from .config import TrainConfig
from .errors import UserError

LAST_NAME = "last.pth"  # the latest finished epoch; its training state sits beside it


RESUME_MAY_CHANGE = ("epochs", "num_workers", "extra")  # options that leave the run's results alone


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


def check_save_dir(save_dir: Path) -> None:
    """A --save_dir that cannot hold checkpoints is refused now, not after the first epoch's work."""
    if save_dir.exists() and not save_dir.is_dir():
        raise UserError(f"--save_dir {save_dir} is a file; pass a folder for the checkpoints")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--save_dir {save_dir}: cannot create it ({e.strerror}); "
                        f"pass a folder you can write to") from None
    if not os.access(save_dir, os.W_OK | os.X_OK):
        raise UserError(f"--save_dir {save_dir} is not writable; pass a folder you can write to")


def load_resume(path: Path, config: TrainConfig, classes: list[str]) -> tuple[Path, dict]:
    """The last checkpoint to continue from and its training state (head, optimizer, history), after
    checking that this run's options match the saved run's."""
    if path.is_dir() or not path.suffix:  # a --save_dir, even one that does not exist
        path = path / LAST_NAME
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist; train without --resume first, "
                        f"or pass the {LAST_NAME} to continue from")
    check_resumable(ckpt_io.load_checkpoint(path), config, classes, path)
    state_path = path.with_name(path.name.replace(".pth", ".state.pth"))
    return path, ckpt_io.load_training_state(state_path)
