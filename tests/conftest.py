"""Shared fixtures: photo folders generated on the fly, so no test needs downloaded data."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


def class_color(index: int, count: int) -> tuple[int, int, int]:
    """Colours on a circle around mid-grey: every class is linearly separable from the others."""
    angle = 2 * math.pi * index / count
    u, v = np.array([1, -1, 0]) / math.sqrt(2), np.array([1, 1, -2]) / math.sqrt(6)
    rgb = 0.5 + 0.4 * (math.cos(angle) * u + math.sin(angle) * v)
    return tuple(int(round(255 * c)) for c in rgb)


def make_image(path: Path, color, *, size=(48, 40), seed=0, fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, size=(size[1], size[0], 3))
    pixels = np.clip(np.array(color)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_dataset(root: Path, classes: list[str], *, per_split=None, size=(48, 40)) -> Path:
    """root/{train,valid,test}/<class>/*.jpg with a distinct colour per class; returns root."""
    per_split = per_split or {"train": 6, "valid": 2, "test": 2}
    for split, n in per_split.items():
        for i, c in enumerate(classes):
            for k in range(n):
                make_image(root / split / c / f"{split}_{c}_{k}.jpg", class_color(i, len(classes)),
                           size=size, seed=hash((split, c, k)) % 2**32)
    return root


@pytest.fixture(autouse=True, scope="session")
def feature_cache_in_tmp(tmp_path_factory):
    """Training caches features; keep the tests' (and their subprocesses') out of ~/.cache."""
    before = os.environ.get("FLOWER_CLASSIFIER_CACHE")
    os.environ["FLOWER_CLASSIFIER_CACHE"] = str(tmp_path_factory.mktemp("feature_cache"))
    yield
    if before is None:
        del os.environ["FLOWER_CLASSIFIER_CACHE"]
    else:
        os.environ["FLOWER_CLASSIFIER_CACHE"] = before


TWELVE = [str(i) for i in range(1, 13)]  # sorts as strings to "1", "10", "11", "12", "2", ...


@pytest.fixture
def twelve_class_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "flowers", TWELVE)


@pytest.fixture
def names_file(tmp_path) -> Path:
    path = tmp_path / "cat_to_name.json"
    path.write_text(json.dumps({c: f"flower {c}" for c in TWELVE}))
    return path


QUIET = dict(progress=False, log=lambda message: None)  # for run_training and load_feature_data


@pytest.fixture
def data(tmp_path) -> Path:
    """Four categories, 4 training and 2 validation photos each: enough for a run on `tiny`."""
    return make_dataset(tmp_path / "flowers", TWELVE[:4], per_split={"train": 4, "valid": 2})


@pytest.fixture(scope="session")
def tiny():
    from flower_classifier.backbones import build_backbone

    return build_backbone("tiny")


@contextlib.contextmanager
def one_thread():
    """PyTorch on one thread for the block: its float32 sums then come in one fixed order, whatever
    the machine's load, and a test's own threads do not fight other processes for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
