"""The tutorial notebook's bookkeeping, kept out of its cells so that a learner reads each step, not
the checks around it: which device the DEVICE knob means, and the checks that stop a cell run out
of order (a knob edited after the cells that use it, a head saved with another config)."""
from __future__ import annotations

import torch

from .data import train_transform
from .devices import mps_available
from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
# The knobs the cells from the config cell to the training cell are built from (not PHOTO, SAVE_DIR,
# ASSETS_DIR, which only later cells read).
BUILT_FROM = ("DATA_DIR", "CATEGORY_NAMES", "ARCH", "HIDDEN_UNITS", "DROPOUT", "LEARNING_RATE", "EPOCHS",
              "BATCH_SIZE", "DEVICE", "NUM_WORKERS", "SEED")


def pick_device(name: str) -> torch.device:
    """The DEVICE knob as a device: "auto" is the GPU when there is one; a GPU this machine lacks
    means the CPU, with a note, as `train.py --gpu` does."""
    if name not in DEVICES:
        raise UserError(f'DEVICE must be "auto", "cpu", "cuda" or "mps" (got {name!r})')
    present = {"cuda": torch.cuda.is_available(), "mps": mps_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, here in present.items() if here))
    if not present[name]:
        print(f"DEVICE = {name!r}: this machine has no {name} device, so everything runs on the CPU")
        return torch.device("cpu")
    return torch.device(name)


def knobs_now(namespace: dict) -> dict:
    """The values of the knobs the cells are built from, as the notebook holds them now."""
    return {name: namespace[name] for name in BUILT_FROM}


def check_cells_current(knobs_used: dict, namespace: dict, *, backbone, train_set) -> None:
    """Stop, in one line, when a knob changed after the cells above ran: training would mix old and
    new parts (say, another backbone's crop size)."""
    stale = [name for name, value in knobs_used.items() if namespace[name] != value]
    if stale or backbone.name != namespace["ARCH"] or \
            repr(train_set.transform) != repr(train_transform(backbone.preprocessing)):
        raise UserError(f"{', '.join(stale) or 'ARCH'} changed after the cells above ran: rerun them, from the config "
                        "cell in section 1 down to here (or Kernel → Restart Kernel and Run All Cells)")


def check_trained_with(trained_with: tuple, *now) -> None:
    """Stop saving a head with another config, backbone or categories than it was trained with: the
    checkpoint would not load back, or would misreport. Both tuples: (config, backbone name, classes, head)."""
    if tuple(now) != tuple(trained_with):  # the same head object, and equal config, name and classes
        raise UserError("the config, backbone or categories changed after the training cell ran: rerun it "
                        "(section 5) before saving")
