"""Saving and loading checkpoints. The only module that knows the checkpoint's key names.

A checkpoint holds what cannot be rebuilt: format version, backbone name and preprocessing, the
head's weights, the category list (output index -> folder name) and names, the config, epoch and
metrics. The frozen backbone is never stored: it is rebuilt from its name. Files are written to a
temporary file and renamed, and read with `torch.load(weights_only=True)`, which runs no code.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import BACKBONES, Preprocessing, build_backbone
from .config import TrainConfig
from .devices import check_device
from .errors import UserError
from .files import atomic_write
from .model import FlowerClassifier, build_head

FORMAT = "flower_classifier.checkpoint"
FORMAT_VERSION = 1
STATE_FORMAT = "flower_classifier.training_state"


@dataclass
class Checkpoint:
    arch: str
    preprocessing: Preprocessing
    head_state: dict[str, torch.Tensor]
    classes: list[str]  # output index -> category folder name
    config: TrainConfig
    cat_to_name: dict[str, str] | None = None  # category folder name -> flower name
    epoch: int = 0  # epochs finished when saved
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def name_of(self, category: str) -> str:
        return (self.cat_to_name or {}).get(category, category)


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path: str | Path, what: str = "checkpoint"):
    """torch.load with weights_only=True, turning every failure into one clear UserError."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoint.pth"
        raise UserError(f"{what} {path} is a folder; pass a file" +
                        (f" such as {inside}" if inside.is_file() and what == "checkpoint" else " in it"))
    if not path.is_file():
        raise UserError(f"{what} {path} not found" + ("" if path.parent.is_dir() else
                        f" (folder {path.parent} does not exist)") + "; train first or pass the right path")
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is an exported ONNX model; this command needs the .pth {what} it was exported "
                        f"from (predict.py and serve take .onnx files)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        if found:  # the file names a Python callable: loading it without weights_only could run code
            raise UserError(f"{path}: refused to load: it refers to {found.group(1)}, beyond plain data and "
                            f"tensors; only load checkpoints you trust, saved by this project") from None
        raise UserError(f"{path}: not a {what} of this project (not a PyTorch file of plain data)") from None
    except Exception as e:  # torch.load raises many kinds on a foreign file: all mean "not ours"
        raise UserError(f"{path}: not a {what} of this project (not a file torch.save wrote: "
                        f"{type(e).__name__})") from None


def _to_plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def head_layer_sizes(head_state: dict[str, torch.Tensor]) -> list[int]:
    """Output sizes of the head's Linear layers, in order: the hidden sizes, then the class count."""
    weights = sorted((int(k.split(".")[0]), v) for k, v in head_state.items()
                     if k.endswith(".weight") and k.split(".")[0].isdigit() and v.dim() == 2)
    return [w.shape[0] for _, w in weights]


def check_head_matches(ckpt: Checkpoint, where: str) -> None:
    """The head's weights must have the shape its config and classes describe, or loading would fail."""
    sizes, expected = head_layer_sizes(ckpt.head_state), [*ckpt.config.hidden_units, len(ckpt.classes)]
    if sizes != expected:
        raise UserError(f"{where}: the head's layer sizes {sizes} differ from what its config and classes "
                        f"describe ({expected}: hidden_units {list(ckpt.config.hidden_units)} + "
                        f"{len(ckpt.classes)} categories); build the head and the config from the same values")


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    check_head_matches(ckpt, f"not saving {path}")
    atomic_save({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": ckpt.arch,
        "preprocessing": ckpt.preprocessing.to_dict(),
        "head_state": _to_plain(ckpt.head_state),
        "classes": list(ckpt.classes),
        "cat_to_name": dict(ckpt.cat_to_name) if ckpt.cat_to_name else None,
        "config": ckpt.config.to_dict(),
        "epoch": int(ckpt.epoch),
        "metrics": dict(ckpt.metrics),
        "history": list(ckpt.history),
    }, path)
    return Path(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    d = safe_load(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no '{FORMAT}' marker); "
                        f"pass a file saved by train.py")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format version {version} is newer than this code reads "
                        f"({FORMAT_VERSION}); update flower_classifier")
    if d["arch"] not in BACKBONES:
        raise UserError(f"{path}: made with backbone {d['arch']!r}, which this version does not know "
                        f"(known: {', '.join(BACKBONES)})")
    return Checkpoint(arch=d["arch"], preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                      head_state=d["head_state"], classes=list(d["classes"]),
                      config=TrainConfig.from_dict(d["config"]), cat_to_name=d.get("cat_to_name"),
                      epoch=d.get("epoch", 0), metrics=d.get("metrics", {}), history=d.get("history", []))


def build_model(ckpt: Checkpoint, *, backbone=None) -> FlowerClassifier:
    """Backbone (rebuilt from its name, or the one given) + head with the saved weights."""
    check_head_matches(ckpt, "cannot build the model")
    backbone = backbone or build_backbone(ckpt.arch)
    head = build_head(backbone.feature_dim, ckpt.config.hidden_units, len(ckpt.classes), ckpt.config.dropout)
    head.load_state_dict(ckpt.head_state)
    return FlowerClassifier(backbone.module, head, classes=ckpt.classes, cat_to_name=ckpt.cat_to_name,
                            preprocessing=ckpt.preprocessing).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[FlowerClassifier, Checkpoint]:
    """The model a checkpoint describes, ready to predict, and the checkpoint itself."""
    device = check_device(device)
    ckpt = load_checkpoint(path)
    return build_model(ckpt).to(device), ckpt


# ---------------------------------------------------------------- resume state (beside the checkpoint)

def save_training_state(path: str | Path, *, epoch: int, optimizer_state: dict, history: list[dict],
                        best_metric: float, head_state: dict) -> None:
    """All that `--resume` needs: no random-number state, since each epoch is seeded from (seed, epoch)."""
    atomic_save({"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch,
                 "optimizer": optimizer_state, "history": history, "best_metric": best_metric,
                 "head_state": _to_plain(head_state)}, path)


def load_training_state(path: str | Path) -> dict:
    d = safe_load(path, what="training state")
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or "head_state" not in d:
        raise UserError(f"{path}: not a training-state file of this project")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path}: training-state format version {version} is newer than this code reads "
                        f"({FORMAT_VERSION}); update flower_classifier")
    return d
