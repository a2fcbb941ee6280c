"""Several processes (GPUs or machines) under `torchrun`: who am I, my share of the work, gather.

Launched by `torchrun --nproc_per_node N train.py ...`, each process extracts the features of every
N-th image (index striding), the features are gathered so that every process holds all of them,
and the head trains with DistributedDataParallel, each process on its share of every epoch's
batches. Run as a plain program, everything here is a no-op and the world has one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this process's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    if not active():  # before `init`, torchrun's RANK already says which process this is
        return os.environ.get("RANK", "0") == "0"
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    if active():
        dist.destroy_process_group()


def my_share(n: int) -> list[int]:
    """Indices of 0..n-1 this process handles: rank, rank + world, rank + 2 * world, ..."""
    return list(range(rank(), n, world_size()))


def sum_over_processes(*values: float) -> list[float]:
    """Each value summed over every process (as it is, in one process): totals of the shares."""
    if world_size() == 1:
        return list(values)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = torch.tensor(values, dtype=torch.float64, device=comm)
    dist.all_reduce(totals)
    return totals.tolist()


def gather_shares(local: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `my_share`: every process's rows (in share order) back into one (n, ...) tensor."""
    world = world_size()
    if world == 1:
        return local
    # all_gather wants equal sizes: pad each share to the longest one, then drop the padding.
    longest = (n + world - 1) // world
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[:len(local)] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        rows = range(r, n, world)
        out[list(rows)] = part[:len(rows)].cpu()
    return out


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the trainable model when there are several processes."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
