"""Where the work runs: CUDA, Apple MPS or the CPU, and with how many threads."""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from .errors import UserError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(gpu: bool, log: Callable[[str], None] = print) -> torch.device:
    """CUDA or Apple MPS when asked for and present; otherwise the CPU, saying so."""
    if gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        log("--gpu: no CUDA or MPS device found, running on the CPU")
    return torch.device("cpu")


def check_device(device: torch.device | str) -> torch.device:
    """The device asked for, if this machine has it; else one line saying how to fall back."""
    device = torch.device(device)
    missing = ((device.type == "cuda" and not torch.cuda.is_available())
               or (device.type == "mps" and not mps_available()))
    if missing:
        raise UserError(f"device {str(device)!r} is not available on this machine; use 'cpu', or "
                        f"select_device(gpu=True), which falls back to the CPU")
    return device


# ---------------------------------------------------------------- compute threads

_chosen_threads: int | None = None  # --threads N while a command runs (`use_threads`), else None


def chosen_threads() -> int | None:
    """The thread count the user chose with --threads, or None: each stage then picks its own."""
    return _chosen_threads


@contextlib.contextmanager
def threads(n: int | None, *, chosen: bool = False):
    """torch's intra-op threads set to `n` (None: left alone) for the block, then restored, so a
    caller in-process gets its own setting back. `chosen`: `n` is the user's --threads, which every
    stage inside the block then uses (ONNX Runtime's sessions too) instead of its own choice."""
    global _chosen_threads
    before, before_chosen = torch.get_num_threads(), _chosen_threads
    if n is not None:
        torch.set_num_threads(n)
        if chosen:
            _chosen_threads = n
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _chosen_threads = before_chosen


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
