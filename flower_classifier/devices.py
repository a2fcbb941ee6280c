"""Where the work runs: CUDA, Apple MPS or the CPU, and with how many threads. Importing it
imports no torch: `--threads` applies to an .onnx model's run, which never loads torch."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Callable

from .errors import UserError

if TYPE_CHECKING:
    import torch


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(gpu: bool, log: Callable[[str], None] = print) -> torch.device:
    """CUDA or Apple MPS when asked for and present; otherwise the CPU, saying so."""
    import torch

    if gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        log("--gpu: no CUDA or MPS device found, running on the CPU")
    return torch.device("cpu")


def check_device(device: torch.device | str) -> torch.device:
    """The device asked for, if this machine has it; else one line saying how to fall back."""
    import torch

    device = torch.device(device)
    missing = ((device.type == "cuda" and not torch.cuda.is_available())
               or (device.type == "mps" and not mps_available()))
    if missing:
        raise UserError(f"device {str(device)!r} is not available on this machine; use 'cpu', or "
                        f"select_device(gpu=True), which falls back to the CPU")
    return device


# ---------------------------------------------------------------- compute threads

_chosen_threads: int | None = None  # --threads N while a command runs (`threads(n, chosen=True)`), else None


def chosen_threads() -> int | None:
    """The thread count the user chose with --threads, or None: each stage then picks its own."""
    return _chosen_threads


@contextlib.contextmanager
def threads(n: int | None, *, chosen: bool = False):
    """torch's intra-op threads set to `n` (None: left alone) for the block, then restored, so a
    caller in-process gets its own setting back. `chosen`: `n` is the user's --threads, which every
    stage inside the block then uses (ONNX Runtime's sessions too) instead of its own choice.
    torch not yet loaded is not loaded here: OMP_NUM_THREADS, which it reads when it loads, says `n`
    for the block (torch caps that at the cores)."""
    global _chosen_threads
    torch = sys.modules.get("torch")
    before, before_chosen = torch.get_num_threads() if torch else None, _chosen_threads
    before_env = os.environ.get("OMP_NUM_THREADS")
    if n is not None:
        if torch:
            torch.set_num_threads(n)
        else:
            os.environ["OMP_NUM_THREADS"] = str(n)
        if chosen:
            _chosen_threads = n
    try:
        yield
    finally:
        if torch:
            torch.set_num_threads(before)
        if n is not None and not torch:
            _set_env("OMP_NUM_THREADS", before_env)
        _chosen_threads = before_chosen


def blas_threads(n: int | None = None):
    """numpy's and scipy's BLAS and LAPACK (OpenBLAS) held to `n` threads for the block, or to the
    user's --threads (`threadpoolctl`, a requirement). Calibration's feature fits (Mahalanobis: a
    few hundred to 1,280 dimensions) took 10-50x longer on the default threads than on one once torch
    had loaded its own OpenMP threads (3.0 s against 0.2 s on 250 photos, 19-95 s against 1.7-1.9 s
    on 2,000, 2 cores, load average 8-10): BLAS threads spin against torch's and the other jobs'."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=chosen_threads() or n or 1, user_api="blas")


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
