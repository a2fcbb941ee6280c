"""Two CPU processes (gloo) split feature extraction and training, and agree with one process."""
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, TWELVE, make_dataset
from flower_classifier import distributed, frozen_pass
from flower_classifier.backbones import build_backbone
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.data import FlowerFolder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extract_in_process(rank: int, world: int, port: int, paths: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert distributed.my_share(5) == list(range(rank, 5, world))
        backbone = build_backbone("tiny")
        result = {view.name: frozen_pass.extract_features(backbone, paths, view)
                  for view in (frozen_pass.centre_view(backbone), frozen_pass.augmented_view(backbone, 1))}
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_extract_the_same_features_as_one(tmp_path):
    data = make_dataset(tmp_path / "d", TWELVE[:3], per_split={"train": 3})  # 9 images: uneven shares
    paths = [p for p, _ in FlowerFolder(data / "train").samples]
    mp.spawn(_extract_in_process, args=(2, _free_port(), paths, str(tmp_path / "f")), nprocs=2)
    backbone = build_backbone("tiny")
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"f.{rank}", weights_only=True)
        for view in (frozen_pass.centre_view(backbone), frozen_pass.augmented_view(backbone, 1)):
            alone, ok = frozen_pass.extract_features(backbone, paths, view)
            assert ok.all() and torch.equal(gathered[view.name][1], ok)
            # Gathered as float16 (as the cache stores them): equal to one process's up to that rounding.
            assert torch.allclose(gathered[view.name][0], alone.half().float(), atol=1e-6)


def _train(data, save_dir, cache_dir, *launcher, options=()):
    """train.py on the tiny backbone, alone or under a launcher; returns its stdout."""
    # Dropout off: each process would draw its own mask for its half of the batch, so the two
    # processes could not give the one process's result (nor should they have to).
    run = subprocess.run([sys.executable, *launcher, "train.py", str(data), "--arch", "tiny", "--workers", "0",
                          "--quiet", "--epochs", "3", "--dropout", "0", "--learning_rate", "0.01",
                          "--save_dir", str(save_dir), "--cache_dir", str(cache_dir), *options],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.parametrize("options", [(), ("--finetune", "1", "--schedule", "onecycle")], ids=["frozen", "finetune"])
def test_torchrun_trains_with_two_processes_as_one_process_does(tmp_path, options):
    """16 training rows, in one batch (the default 32): one process takes the mean gradient over all
    16; two take it over 8 each and DistributedDataParallel averages the two. Same seed, same head
    (and, with --finetune, the same top block, trained on the cached activations below it)."""
    data = make_dataset(tmp_path / "d", TWELVE[:4], per_split={"train": 4, "valid": 2})
    out = _train(data, tmp_path / "ck", tmp_path / "c", "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", options=options)
    assert "x 2 processes" in out
    rows = "Activations below the top 1 blocks:" if options else "Features:"
    assert out.count("Epoch 1/3") == 1 and out.count(rows) == 1  # only rank 0 speaks
    assert out.count("Category names:") == 1  # also before the processes join (RANK says who is first)
    # Each process wrote its own share as its own shard: 16 + 8 centre crops in all.
    shards = list((tmp_path / "c").rglob("*.npy"))
    assert len(shards) == 2 and sum(len(np.load(s)) for s in shards) == 24
    _train(data, tmp_path / "alone", tmp_path / "c2", options=options)
    two, one = (load_checkpoint(tmp_path / folder / "last.pth") for folder in ("ck", "alone"))
    assert two.epoch == one.epoch == 3
    # Not bit-identical: the two halves' means averaged by all_reduce round differently from one mean
    # over 16 rows (float32 sums in another order), ~1e-7 per step. AdamW divides each gradient by
    # its own running size, so where a gradient is near zero that rounding can grow to ~1e-5 in a
    # weight (seen on the CI machine's CPU; 3e-8 here). So the whole tensor is compared: the two
    # runs' difference is under 1e-4 of the weights' size. With the averaging switched off (each
    # process stepping on its own 8 rows) it was 7% to 67% of their size, per tensor.
    def close(mine, theirs):
        mine, theirs = mine.float(), theirs.float()
        return torch.linalg.norm(mine - theirs) <= 1e-4 * torch.linalg.norm(theirs) + 1e-7

    for key, weight in one.head_state.items():
        assert close(two.head_state[key], weight), key
    assert bool(one.top_state) == bool(options)
    for key, weight in (one.top_state or {}).items():
        assert close(two.top_state[key], weight), key
    for mine, theirs in zip(two.history, one.history):
        for metric in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_top5"):
            assert abs(mine[metric] - theirs[metric]) < 1e-4, (metric, mine, theirs)
