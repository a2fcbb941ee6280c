"""Hyperparameters of one training run, as one dataclass that travels inside the checkpoint."""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# `search` writes its best values here; training's defaults read them (see `load_defaults`).
DEFAULTS_FILE = Path("hyperparameters.json")


@dataclass
class TrainConfig:
    arch: str = "vgg16"  # backbone name, see `backbones.BACKBONES`
    hidden_units: tuple[int, ...] = (512,)  # hidden layer sizes of the new head
    dropout: float = 0.2  # dropout before each hidden and the output layer
    learning_rate: float = 1e-3  # AdamW step size for the head
    weight_decay: float = 0.0  # L2 penalty (AdamW-style, decoupled)
    epochs: int = 5  # passes over the training split
    batch_size: int = 32  # images per step
    seed: int = 0  # seeds Python, NumPy and torch for repeatable runs
    num_workers: int = 2  # data-loading worker processes (0 = in the main process)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    augment: bool = True  # random crop / rotation / flip: every epoch (classic) or augmented views (cached)
    feature_cache: bool = True  # train the head on backbone features computed once (False: --classic)
    augmented_views: int = 0  # cached path: augmented copies per training image, besides the centre crop
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. where defaults came from)

    def __post_init__(self) -> None:
        # Types first: a string or a float here would otherwise fail deep inside training.
        if _is(self.hidden_units, numbers.Integral):
            self.hidden_units = (self.hidden_units,)  # `hidden_units=512` means one hidden layer
        if isinstance(self.hidden_units, (str, bytes)) or not _all_are(self.hidden_units, numbers.Integral):
            raise UserError(f"hidden_units must be a list of integers, e.g. [512] (got {self.hidden_units!r})")
        self.hidden_units = tuple(int(h) for h in self.hidden_units)
        wrong = [f"{name} must be {what} (got {getattr(self, name)!r})"
                 for name, (kind, what) in _TYPES.items() if not _is(getattr(self, name), kind)]
        if wrong:
            raise UserError("; ".join(wrong))
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1 (got {self.epochs})")
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be positive (got {self.learning_rate})")
        if self.batch_size < 1:
            problems.append(f"--batch_size must be at least 1 (got {self.batch_size})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if any(h < 1 for h in self.hidden_units):
            problems.append(f"--hidden_units must be positive integers (got {list(self.hidden_units)})")
        if self.weight_decay < 0:
            problems.append(f"--weight_decay must be >= 0 (got {self.weight_decay})")
        if self.num_workers < 0:
            problems.append(f"--workers must be >= 0 (got {self.num_workers})")
        if self.augmented_views < 0:
            problems.append(f"--augmented_views must be >= 0 (got {self.augmented_views})")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden_units"] = list(self.hidden_units)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        # Ignore keys this version does not know, so older code reads newer configs' common part.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _is(value, kind) -> bool:
    """isinstance, except that True and False count only as bool, not as numbers."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _all_are(values, kind) -> bool:
    try:
        return all(_is(v, kind) for v in values)
    except TypeError:  # not iterable
        return False


_INTEGER, _NUMBER = (numbers.Integral, "an integer"), (numbers.Real, "a number")  # numpy's too
_TYPES = {"arch": (str, "a string"), "dropout": _NUMBER, "learning_rate": _NUMBER, "weight_decay": _NUMBER,
          "epochs": _INTEGER, "batch_size": _INTEGER, "seed": _INTEGER, "num_workers": _INTEGER,
          "label_smoothing": _NUMBER, "augment": (bool, "True or False"), "feature_cache": (bool, "True or False"),
          "augmented_views": _INTEGER, "extra": (dict, "a dict")}


def load_defaults(path: Path = DEFAULTS_FILE) -> dict:
    """Hyperparameters saved by `search`, or {} when there are none."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable hyperparameters file ({e}); fix or delete it") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in values.get("hyperparameters", values).items() if k in known}
