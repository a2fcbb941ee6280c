"""Where the work runs: CUDA, Apple MPS or the CPU."""
from __future__ import annotations

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
