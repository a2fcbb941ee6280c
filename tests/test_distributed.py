"""Two CPU processes (gloo) split feature extraction and training, and agree with one process."""
import socket
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, TWELVE, make_dataset
from flower_classifier import distributed, features
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
        result = {view.name: features.extract_features(backbone, paths, view)
                  for view in (features.centre_view(backbone), features.augmented_view(backbone, 1))}
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
        for view in (features.centre_view(backbone), features.augmented_view(backbone, 1)):
            alone, ok = features.extract_features(backbone, paths, view)
            assert ok.all() and torch.equal(gathered[view.name][1], ok)
            # Gathered as float16 (as the cache stores them): equal to one process's up to that rounding.
            assert torch.allclose(gathered[view.name][0], alone.half().float(), atol=1e-6)


def test_torchrun_trains_with_two_processes(tmp_path):
    data = make_dataset(tmp_path / "d", TWELVE[:4], per_split={"train": 4, "valid": 2})
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", str(data), "--arch", "tiny", "--workers", "0", "--quiet", "--epochs", "2",
                          "--save_dir", str(tmp_path / "ck"), "--cache_dir", str(tmp_path / "c")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "x 2 processes" in run.stdout
    assert run.stdout.count("Epoch 1/2") == 1 and run.stdout.count("Features:") == 1  # only rank 0 speaks
    assert load_checkpoint(tmp_path / "ck" / "checkpoint.pth").epoch in (1, 2)
    # Each process wrote its own share as its own shard: 12 + 12 centre crops.
    shards = list((tmp_path / "c").rglob("*.npy"))
    assert len(shards) == 2 and sum(len(np.load(s)) for s in shards) == 24
