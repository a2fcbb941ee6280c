"""Models and a live server for the export, serving and browser tests (imported by those tests).

`lite0_checkpoint`: the real EfficientNet-Lite0 backbone with a small head fitted in a second to
the three committed photos, so that its top-5 are real flower names and not a tie.
`tiny_checkpoint`: the random tiny backbone, for tests where only the plumbing matters.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import zlib
import threading
import time
from pathlib import Path

import torch

from flower_classifier.backbones import build_backbone, split_backbone
from flower_classifier.checkpoint import Checkpoint, save_checkpoint
from flower_classifier.config import TrainConfig
from flower_classifier.model import build_head
from flower_classifier.predictor import process_image

PHOTOS = Path(__file__).parent / "data"
FLOWERS = {"1": "daisy", "2": "dandelion", "3": "rose", "4": "sunflower", "5": "tulip"}
PHOTO_CATEGORY = {"daisy.jpg": "1", "rose.jpg": "3", "sunflower.jpg": "4"}


def photo(name: str) -> Path:
    return PHOTOS / name


def lite0_checkpoint(path: Path) -> Path:
    backbone = build_backbone("efficientnet_lite0")
    config = TrainConfig(arch="efficientnet_lite0", hidden_units=(32,), dropout=0.0)
    classes = list(FLOWERS)
    images = torch.stack([process_image(photo(n), backbone.preprocessing) for n in PHOTO_CATEGORY])
    labels = torch.tensor([classes.index(c) for c in PHOTO_CATEGORY.values()])
    with torch.no_grad():
        features = backbone.module(images)  # (3, 1280)
    torch.manual_seed(0)
    head = build_head(backbone.feature_dim, config.hidden_units, len(classes), config.dropout)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(30):  # until each photo's own category clearly wins, well short of certainty
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    ckpt = Checkpoint("efficientnet_lite0", backbone.preprocessing, head.state_dict(), classes, config, FLOWERS)
    return save_checkpoint(ckpt, path)


def tiny_models(folder: Path) -> dict[str, Path]:
    """The tiny checkpoint and its ONNX export: the two backends the app's tests run."""
    from flower_classifier.export import export_onnx

    checkpoint = tiny_checkpoint(folder / "tiny.pth")
    return {"pytorch": checkpoint, "onnx": export_onnx(checkpoint, folder / "tiny.onnx")}


def tiny_checkpoint(path: Path, num_classes: int = 6) -> Path:
    backbone = build_backbone("tiny")
    config = TrainConfig(arch="tiny", hidden_units=(8,), dropout=0.0)
    torch.manual_seed(1)
    head = build_head(backbone.feature_dim, config.hidden_units, num_classes, config.dropout)
    classes = [str(i) for i in range(1, num_classes + 1)]
    ckpt = Checkpoint("tiny", backbone.preprocessing, head.state_dict(), classes, config,
                      {c: f"flower {c}" for c in classes})
    return save_checkpoint(ckpt, path)


def finetuned_checkpoint(path: Path, arch: str = "tiny", n: int = 1) -> Path:
    """`arch` with its top n blocks changed as fine-tuning would change them (each weight scaled by
    1 + 10% seeded noise) under a small random head: only a checkpoint carrying them predicts like it."""
    backbone = build_backbone(arch)
    _, top = split_backbone(backbone, n)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in top.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    config = TrainConfig(arch=arch, hidden_units=(8,), dropout=0.0, finetune=n)
    torch.manual_seed(1)
    head = build_head(backbone.feature_dim, config.hidden_units, len(FLOWERS), config.dropout)
    ckpt = Checkpoint(arch, backbone.preprocessing, head.state_dict(), list(FLOWERS), config, FLOWERS,
                      top_state=top.state_dict())
    return save_checkpoint(ckpt, path)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims width x height pixels, and that holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
