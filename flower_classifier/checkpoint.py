"""Saving and loading checkpoints. The only module that knows the checkpoint's key names.

A checkpoint holds what cannot be rebuilt: format version, backbone name and preprocessing, the
head's weights, the fine-tuned top blocks' weights (`--finetune N`: the last N blocks and the tail;
none for a frozen backbone), the category list (output index -> folder name) and names, the config, epoch and
metrics, and the calibration (temperature, unknown score and threshold; absent in checkpoints from
before it, which then predict uncalibrated and never answer "unknown"). The frozen backbone is never
stored: it is rebuilt from its name, and the fine-tuned top is loaded onto it. Files are written to a
temporary file and renamed, and read with `torch.load(weights_only=True)`, which runs no code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import BACKBONES, build_backbone, freeze, split_backbone
from .calibration import Calibration
from .images import Preprocessing
from .config import TrainConfig
from .devices import check_device
from .errors import UserError, quoted
from .files import atomic_save, safe_load
from .model import FlowerClassifier, build_head

BEST_NAME = "checkpoint.pth"  # a run folder's best checkpoint (`runfolder`): what predict.py loads
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
    run_id: str | None = None  # the training run that wrote it (`runfolder`): one per run, kept on --resume
    calibration: Calibration | None = None  # fitted once training ends (or by `calibrate`); None before
    # `split_backbone(arch, config.finetune)`'s top: its state_dict; {} for a frozen backbone (and before it)
    top_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _to_plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def head_layer_sizes(head_state: dict[str, torch.Tensor]) -> list[int]:
    """Output sizes of the head's Linear layers, in order: the hidden sizes, then the class count."""
    weights = sorted((int(k.split(".")[0]), v) for k, v in head_state.items()
                     if k.endswith(".weight") and k.split(".")[0].isdigit() and v.dim() == 2)
    return [w.shape[0] for _, w in weights]


def check_head(head_state, *, arch: str, hidden_units, num_classes: int, where: str) -> None:
    """The head's weights are finite tensors of exactly the shapes that the backbone's feature size,
    `hidden_units` and the class count give; else loading them would fail or predict garbage."""
    if not isinstance(head_state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in head_state.items()):
        raise UserError(f"{where}: head_state must be a dict of named tensors (got {_show(head_state)})")
    sizes, described = head_layer_sizes(head_state), [*hidden_units, num_classes]
    if sizes != described:
        raise UserError(f"{where}: the head's layer sizes {sizes} differ from what its config and classes "
                        f"describe ({described}: hidden_units {list(hidden_units)} + {num_classes} categories); "
                        f"build the head and the config from the same values")
    feature_dim = BACKBONES[arch].feature_dim
    with torch.device("meta"):  # shapes only: nothing is allocated, however large the config says
        expected = build_head(feature_dim, hidden_units, num_classes, 0.0).state_dict()
    for key, want in expected.items():
        got = head_state.get(key)
        if got is None or got.shape != want.shape:
            raise UserError(f"{where}: head_state {quoted(key)} has shape {None if got is None else list(got.shape)}, "
                            f"but backbone {arch} ({feature_dim} features), hidden_units {list(hidden_units)} and "
                            f"{num_classes} categories need {list(want.shape)}")
    extra = sorted(set(head_state) - set(expected))
    if extra:
        raise UserError(f"{where}: head_state holds {quoted(extra[0])}, which the head has not")
    for key, value in head_state.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise UserError(f"{where}: the head's weights {quoted(key)} are not all finite numbers (nan or inf): the "
                            f"training that made them diverged; train again with a lower --learning_rate")


def check_top(top_state, *, arch: str, finetune: int, where: str) -> None:
    """The fine-tuned top's weights are finite tensors of exactly the names, shapes and dtypes of
    `split_backbone(arch, finetune)`'s top (none when finetune is 0); else loading them would fail
    or predict garbage."""
    if not isinstance(top_state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in top_state.items()):
        raise UserError(f"{where}: top_state must be a dict of named tensors (got {_show(top_state)})")
    expected = {}
    if finetune:  # a frozen run's checkpoint never builds the backbone's shapes
        spec = BACKBONES[arch]
        if finetune > spec.num_blocks:
            raise UserError(f"{where}: config finetune {finetune}, but backbone {arch} has {spec.num_blocks} blocks")
        expected = spec.top_layout(finetune)  # meta tensors: names, shapes and dtypes only
    for key, want in expected.items():
        got = top_state.get(key)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            found = "is missing" if got is None else f"is {got.dtype} of shape {list(got.shape)}"
            raise UserError(f"{where}: top_state {quoted(key)} {found}, but the top {finetune} blocks of {arch} "
                            f"(config finetune {finetune}) need {want.dtype} of shape {list(want.shape)}")
    extra = sorted(set(top_state) - set(expected))
    if extra:
        raise UserError(f"{where}: top_state holds {quoted(extra[0])}, which the top {finetune} blocks of {arch} "
                        f"(config finetune {finetune}) have not")
    for key, value in top_state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{where}: the fine-tuned blocks' weights {quoted(key)} are not all finite numbers (nan or "
                            f"inf): the training that made them diverged; train again with a lower --learning_rate")


def _show(value) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else quoted(value)


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    check_head(ckpt.head_state, arch=ckpt.arch, hidden_units=ckpt.config.hidden_units,
               num_classes=len(ckpt.classes), where=f"not saving {path}")
    check_top(ckpt.top_state, arch=ckpt.arch, finetune=ckpt.config.finetune, where=f"not saving {path}")
    atomic_save({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": ckpt.arch,
        "preprocessing": ckpt.preprocessing.to_dict(),
        "head_state": _to_plain(ckpt.head_state),
        **({"top_state": _to_plain(ckpt.top_state)} if ckpt.top_state else {}),
        "classes": list(ckpt.classes),
        "cat_to_name": dict(ckpt.cat_to_name) if ckpt.cat_to_name else None,
        "config": ckpt.config.to_dict(),
        "epoch": int(ckpt.epoch),
        "metrics": dict(ckpt.metrics),
        "history": list(ckpt.history),
        "run_id": ckpt.run_id,
        **({"calibration": ckpt.calibration.to_dict()} if ckpt.calibration else {}),
    }, path)
    return Path(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file, every field checked for type and range before use: UserError naming the
    file and the field otherwise (an edited or damaged file must not allocate, crash or mispredict)."""
    d = safe_load(path, example=BEST_NAME)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no '{FORMAT}' marker); "
                        f"pass a file saved by train.py")
    _check_version(d, path, "checkpoint")
    field_of = _FieldChecker(d, path, "checkpoint")
    arch = field_of("arch", lambda v: isinstance(v, str), "a backbone name")
    if arch not in BACKBONES:
        raise UserError(f"{path}: made with backbone {quoted(arch)}, which this version does not know "
                        f"(known: {', '.join(BACKBONES)})")
    preprocessing = Preprocessing.from_dict(d.get("preprocessing"), where=f"{path}: field 'preprocessing'")
    config = _config(field_of("config", lambda v: isinstance(v, dict), "a dict of training options"), path)
    if config.arch != arch:
        raise UserError(f"{path}: field 'config' names backbone {quoted(config.arch)}, field 'arch' {quoted(arch)}; "
                        f"the file was edited: use one train.py saved")
    classes = field_of("classes", lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v)
                       and len(set(v)) == len(v), "a non-empty list of unique category names")
    names = field_of("cat_to_name", lambda v: v is None or isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(n, str) for k, n in v.items()), "None or a {category: name} dict of strings")
    check_head(d.get("head_state"), arch=arch, hidden_units=config.hidden_units, num_classes=len(classes),
               where=f"{path}")
    top_state = d.get("top_state", {})  # absent: a frozen backbone, or a file from before fine-tuning
    check_top(top_state, arch=arch, finetune=config.finetune, where=f"{path}")
    calibration = None
    if d.get("calibration") is not None:
        calibration = Calibration.from_dict(d["calibration"], where=str(path), num_classes=len(classes),
                                            feature_dim=BACKBONES[arch].feature_dim)
    return Checkpoint(arch=arch, preprocessing=preprocessing, head_state=d["head_state"], classes=classes,
                      config=config, cat_to_name=names,
                      epoch=field_of("epoch", _is_count, "a whole number >= 0", default=0),
                      metrics=field_of("metrics", _is_plain_record, "a dict of plain values", default={}),
                      history=field_of("history", lambda v: isinstance(v, list) and all(map(_is_plain_record, v)),
                                       "a list of dicts of plain values", default=[]),
                      run_id=field_of("run_id", _is_run_id, "None or a short string", default=None),
                      calibration=calibration, top_state=top_state)


class _FieldChecker:
    """`check(name, ok, what)`: the field's value if `ok(value)`, else one UserError naming file and field."""

    def __init__(self, d: dict, path, what: str):
        self.d, self.path, self.what = d, path, what

    def __call__(self, name: str, ok, expected: str, **default):
        if name not in self.d and default:
            return default["default"]
        value = self.d.get(name)
        if not ok(value):
            missing = "is missing" if name not in self.d else f"must be {expected} (got {_show(value)})"
            raise UserError(f"{self.path}: {self.what} field {name!r} {missing}; the file was edited or damaged: "
                            f"use one train.py saved")
        return value


def _check_version(d: dict, path, what: str) -> None:
    version = d.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{path}: {what} field 'format_version' must be a positive integer (got {_show(version)}); "
                        f"the file was edited or damaged")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: {what} format version {version} is newer than this code reads "
                        f"(version {FORMAT_VERSION}); update flower_classifier")


def _config(values: dict, path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(values)
    except UserError as e:
        raise UserError(f"{path}: field 'config': {e}") from None
    except TypeError as e:  # a key of the wrong kind (not a string)
        raise UserError(f"{path}: field 'config' is not a dict of training options ({e})") from None


_PLAIN = (str, int, float, bool, type(None))


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_plain_record(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, _PLAIN) for k, x in v.items())


def _is_run_id(v) -> bool:
    return v is None or isinstance(v, str) and 0 < len(v) <= 64


def load_weights(ckpt: Checkpoint, head: torch.nn.Module | None, top: torch.nn.Module | None = None) -> None:
    """The one place a checkpoint's weights go into modules: its head into `head`, its fine-tuned
    blocks (if any) into `top` (`split_backbone`'s top at its --finetune); None: leave that part."""
    if head is not None:
        head.load_state_dict(ckpt.head_state)
    if top is not None and ckpt.top_state:
        top.load_state_dict(ckpt.top_state)


def build_model(ckpt: Checkpoint, *, backbone=None) -> FlowerClassifier:
    """Backbone (rebuilt from its name, or the one given) with its fine-tuned top blocks loaded
    (`--finetune`), + head with the saved weights: frozen, in eval mode, for predicting."""
    check_head(ckpt.head_state, arch=ckpt.arch, hidden_units=ckpt.config.hidden_units,
               num_classes=len(ckpt.classes), where="cannot build the model")
    check_top(ckpt.top_state, arch=ckpt.arch, finetune=ckpt.config.finetune, where="cannot build the model")
    backbone = backbone or build_backbone(ckpt.arch)
    top = split_backbone(backbone, ckpt.config.finetune)[1] if ckpt.config.finetune else None  # the backbone's own
    head = build_head(backbone.feature_dim, ckpt.config.hidden_units, len(ckpt.classes), ckpt.config.dropout)
    load_weights(ckpt, head, top)
    if top is not None:
        freeze(top)
    return FlowerClassifier(backbone.module, head, classes=ckpt.classes, cat_to_name=ckpt.cat_to_name,
                            preprocessing=ckpt.preprocessing, calibration=ckpt.calibration).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[FlowerClassifier, Checkpoint]:
    """The model a checkpoint describes, ready to predict, and the checkpoint itself."""
    device = check_device(device)
    ckpt = load_checkpoint(path)
    return build_model(ckpt).to(device), ckpt


# ---------------------------------------------------------------- resume state (beside the checkpoint)

def save_training_state(path: str | Path, *, epoch: int, optimizer_state: dict, history: list[dict],
                        best_metric: float, head_state: dict, run_id: str | None, top_state: dict | None = None,
                        scheduler_state: dict | None = None) -> None:
    """All that `--resume` needs: no random-number state, since each epoch is seeded from (seed, epoch);
    the fine-tuned blocks' weights (`--finetune`) and the learning-rate schedule's state when there are."""
    weights = {**head_state, **(top_state or {})}
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        raise UserError(f"not saving {path}: the head's weights are not all finite numbers (nan or inf)")
    atomic_save({"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch,
                 "optimizer": optimizer_state, "history": history, "best_metric": best_metric,
                 "head_state": _to_plain(head_state), "run_id": run_id,
                 **({"top_state": _to_plain(top_state)} if top_state else {}),
                 **({"scheduler": scheduler_state} if scheduler_state is not None else {})}, path)


def load_training_state(path: str | Path) -> dict:
    """The training-state file's fields, each checked for type; the head's shape is checked against
    its checkpoint by `runfolder.load_resume`."""
    d = safe_load(path, what="training state")
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or "head_state" not in d:
        raise UserError(f"{path}: not a training-state file of this project")
    _check_version(d, path, "training-state")
    field_of = _FieldChecker(d, path, "training-state")
    field_of("epoch", lambda v: _is_count(v) and v >= 1, "a whole number >= 1")
    field_of("optimizer", lambda v: isinstance(v, dict), "a dict (the optimizer's state)")
    field_of("history", lambda v: isinstance(v, list) and all(map(_is_plain_record, v)),
             "a list of dicts of plain values")
    field_of("best_metric", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
             "a finite number")
    field_of("head_state", lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
             "a dict of tensors")
    d.setdefault("run_id", None)
    field_of("run_id", _is_run_id, "None or a short string")
    d.setdefault("top_state", {})  # a frozen backbone's run, or one from before fine-tuning
    field_of("top_state", lambda v: isinstance(v, dict), "a dict of tensors")  # checked by `runfolder.load_resume`
    d.setdefault("scheduler", None)
    field_of("scheduler", lambda v: v is None or isinstance(v, dict), "None or a dict (the schedule's state)")
    return d
