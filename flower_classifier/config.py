"""Every option a user gives, declared once: TrainConfig's fields carry their flag, help text, type
and range, and the command line, TrainConfig's own checks and hyperparameters.json's checks are all
built from them. Torch-free, so that building the command line imports no torch."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, quoted

# `search` writes its best values here; training's defaults read them (see `load_defaults`).
DEFAULTS_FILE = Path("hyperparameters.json")
MAX_IMBALANCE = 10.0  # check-data: largest / smallest category of a split above this is flagged


@dataclass(frozen=True)
class Number:
    """An option's type and range: parses command-line text and checks values from anywhere."""
    kind: type  # int or float
    lo: float
    hi: float
    lo_open: bool = False  # lo itself excluded (a learning rate of 0 trains nothing)

    def problem(self, value) -> str | None:
        """Why `value` is not acceptable, or None."""
        if not _is(value, numbers.Integral if self.kind is int else numbers.Real):
            return f"must be {'an integer' if self.kind is int else 'a number'} (got {quoted(value)})"
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # isfinite(10**400) overflows
            return f"must be a finite number (got {quoted(value)})"
        if value < self.lo or (self.lo_open and value == self.lo):
            return f"must be {'>' if self.lo_open else '>='} {self._show(self.lo)} (got {quoted(value)})"
        if value > self.hi:
            return f"must be <= {self._show(self.hi)} (got {quoted(value)})"
        return None

    def _show(self, bound: float) -> str:
        return str(int(bound)) if self.kind is int else f"{bound:g}"

    def parse(self, text: str):
        """argparse's `type=`: the value, or ArgumentTypeError naming what is wrong."""
        import argparse

        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quoted(text)} is not a valid {self.kind.__name__}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


# The upper bounds are far beyond any useful run; they are there so that a typo (1e20, an extra
# zero or six) is refused in one line instead of allocating terabytes or running for years.
HIDDEN = Number(int, 1, 2**16)  # a 65536-wide layer on VGG's 25088 features is already 6.6 GB
MAX_HIDDEN_LAYERS = 16
FRACTION = Number(float, 0, 0.99)  # dropout 1 or label smoothing 1 leaves nothing to learn from
WORKERS = Number(int, 0, 256)  # processes; more than any machine here has cores
THREADS = Number(int, 1, 1024)  # --threads: compute threads of a process
ENGINES = ("auto", "torch", "onnx")
SCHEDULES = ("constant", "onecycle", "cosine")  # `training.lr_multiplier` draws each
# How unlike the training species a photo is (see `calibration`): from the logits, then from the features.
UNKNOWN_SCORES = ("msp", "energy", "max_logit", "mahalanobis", "mahalanobis_species", "cosine", "knn", "near_far")
KEEP = 0.95  # share of species photos the unknown threshold keeps, by default


# Named sets of options (`--recipe NAME`, `TrainConfig.of_recipe`): the values they set, once. Options
# given beside a recipe win over it, and so do `search`'s saved values (hyperparameters.json).
# Measured by bench/bench_accuracy.py on flower_photos_2k (docs/benchmarks.md, Accuracy): see each comment.
RECIPES: dict[str, dict] = {
    "plain": {},  # the built-in defaults below, as they are
    # Chosen on flower_photos_2k's valid/ (3 seeds each): label smoothing 0.1 was the one change to
    # the head that helped both there and on the 300-photo sample; a wider head, augmented views,
    # more epochs, mirror TTA and Lite2 (224-px photos) did not. Fine-tuning the top blocks on top
    # of it (bench/bench_recipe.py, whole train.py runs) raised valid/ 92.0 -> 93.5% (2 blocks) and
    # 94.2% (4 blocks), test/ 90.7 -> 91.9% and 93.2%, each seed above every frozen seed (the
    # sample: level); see docs/benchmarks.md, Fine-tuning on 2,269 photos, for the cost against the
    # frozen default's cold run. --finetune 0 keeps the recipe frozen.
    "best": {"arch": "efficientnet_lite0", "label_smoothing": 0.1, "finetune": 4},
}


def recipe_flags(name: str) -> str:
    """What recipe `name` sets, as the flags that set it: "--arch efficientnet_lite2 --epochs 10" (each
    key's flag is --key: `recipe_problem` refuses any other, so this can run before TrainConfig exists)."""
    shown = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return " ".join(f"--{k} {shown(v)}" for k, v in RECIPES[name].items()) or "nothing beyond the defaults"


def option(default, help: str, number: Number | None = None, *, flag: str | None = None, search=None, **argparse_kw):
    """A TrainConfig field: its default, its help text (the default is added), its range, its flag
    (`--name` unless given; "" for none built from the field) and, for `search`, the values it samples."""
    meta = dict(help=help, number=number, flag=flag, search=search, argparse=argparse_kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    arch: str = option("vgg16", "backbone; see `python -m flower_classifier backbones`")
    hidden_units: tuple[int, ...] = option((512,), "hidden layer size(s) of the head, e.g. 1024 256", HIDDEN,
                                           nargs="+", search=[[256], [512], [1024], [512, 256]])
    dropout: float = option(0.2, "dropout in the head", FRACTION, search=[0.0, 0.1, 0.2, 0.3, 0.5])
    learning_rate: float = option(1e-3, "head learning rate (AdamW)", Number(float, 0, 10, lo_open=True),
                                  search=(1e-4, 1e-2))  # a (low, high) pair: sampled log-uniformly
    # 0.01 changed nothing measurable on the sample (bench/bench_recipe.py: 86.0% test either way, 2 seeds).
    weight_decay: float = option(0.0, "AdamW weight decay (decoupled)", Number(float, 0, 10),
                                 search=[0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    epochs: int = option(5, "epochs", Number(int, 1, 100_000), search=[5, 10, 15, 20, 30])
    batch_size: int = option(32, "images per step", Number(int, 1, 2**16), search=[16, 32, 64, 128])
    # numpy's seeds are 32-bit: a larger one would be folded silently, or overflow in torch.
    seed: int = option(0, "random seed; the same seed gives the same run", Number(int, 0, 2**32 - 1))
    num_workers: int = option(2, "data-loading worker processes (0 = in the main process)", WORKERS, flag="")
    # 0.1 is in `--recipe best` (see RECIPES); 0 stays the built-in default, which the notebook's own
    # loop (a plain CrossEntropyLoss) matches.
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", FRACTION, search=[0.0, 0.05, 0.1, 0.2])
    class_weights: str = option("none", "training loss weight per category: none (every image counts the same) or "
                                "balanced (n_images / (n_categories * the category's n_images), counted on the "
                                "training split: each category weighs the same in the loss, the usual 'balanced' rule)",
                                choices=("none", "balanced"))
    augment: bool = option(True, "centre crops only: no random crop, rotation, flip (classic loop) and no augmented "
                           "views (cached path)", flag="--no_augment", action="store_false")
    feature_cache: bool = option(True, "run the backbone on every image in every epoch, augmenting afresh each time: "
                                 "the slow reference loop (default: compute each image's features once and train on "
                                 "them)", flag="--classic", action="store_false")
    # Each view is one more backbone pass over the training split.
    augmented_views: int = option(0, "cached path: augmented copies of each training image, computed once, besides "
                                  "its centre crop", Number(int, 0, 100))
    # "auto" is resolved where the device is known (`frozen_pass.resolve_engine`): the engine a run used
    # is what its cache entries and its checkpoint's config record.
    engine: str = option("auto", "what runs the frozen backbone for the feature pass: onnx (ONNX Runtime, CPU, "
                         "fp32), torch, or auto: onnx on the CPU, torch on CUDA/MPS", choices=ENGINES)
    # The blocks below the split stay frozen, so their output per photo view is cached like the features.
    finetune: int = option(0, "fine-tune the last N blocks of the backbone together with the head (0: frozen backbone); "
                           "`python -m flower_classifier backbones` shows each backbone's blocks and what caching "
                           "below the split costs", Number(int, 0, 1000), search=[0, 1, 2, 4])
    # Discriminative rates (fastai's slice(lr/100, lr), Lightning's BackboneFinetuning 0.1): pretrained
    # blocks sit near a good solution and a few hundred photos pull them off it at the head's rate.
    # 0.1, Lightning's ratio, measured on the sample against 0.01 and 1 (README, Fine-tuning the top blocks).
    backbone_lr_factor: float = option(0.1, "--finetune: the fine-tuned blocks' learning rate is the head's times this",
                                       Number(float, 0, 1, lo_open=True), search=[0.01, 0.03, 0.1, 0.3, 1.0])
    # Stepped per batch; its step count is in the training state, so --resume continues the same curve.
    # constant by default: over 5 epochs on the sample, onecycle and cosine lowered both the frozen head
    # (test 83% and 81% against 86%) and --finetune 2 (84% against 87%) (bench/bench_recipe.py, 2 seeds).
    schedule: str = option("constant", "learning-rate schedule of head and blocks, stepped per batch: constant, "
                           "onecycle (from 1/25 of the rate up over the first quarter of the steps, then cosine "
                           "down) or cosine (up over the first twentieth of the steps, then cosine down to 0)",
                           choices=SCHEDULES, search=list(SCHEDULES))
    patience: int = option(0, "stop when the validation loss has not improved for this many epochs (0: off; "
                           "the best epoch by validation accuracy is kept as always)", Number(int, 0, 100_000))
    # Measured leaving each species of flower_photos_2k out (bench/bench_unknown.py --leave_species_out):
    # near_far catches 23% of the species left out (mahalanobis 16%, msp 15%) and as many non-flowers as
    # mahalanobis (98%; msp 39%). docs/unknown-and-calibration.md has the table.
    unknown_score: str = option("near_far", "how \"not one of the species\" is scored after training: "
                                f"{', '.join(UNKNOWN_SCORES)}", choices=UNKNOWN_SCORES)
    keep: float = option(KEEP, "share of the species photos calibrated on (valid, or train+valid cross-fitted) the unknown threshold keeps",
                         Number(float, 0.5, 1.0))
    # Which named set of options the run started from; the values themselves are in the other fields.
    recipe: str = option("plain", "a named set of options, each measured (options given beside it win): "
                         + "; ".join(f"{name}: {recipe_flags(name)}" for name in RECIPES), choices=tuple(RECIPES))
    extra: dict = option({}, "free-form notes (e.g. where defaults came from)", flag="")

    def __post_init__(self) -> None:
        if _is(self.hidden_units, numbers.Integral):
            self.hidden_units = (self.hidden_units,)  # `hidden_units=512` means one hidden layer
        problems = [f"{name} {problem}" for name in FIELDS if (problem := field_problem(name, getattr(self, name)))]
        if problems:
            raise UserError("; ".join(problems))
        self.hidden_units = tuple(int(h) for h in self.hidden_units)

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

    @classmethod
    def of_recipe(cls, name: str, **changes) -> "TrainConfig":
        """The config of recipe `name` (see RECIPES), with `changes` on top: what `train.py --recipe`
        gives when those options are also on its command line."""
        if name not in RECIPES:
            raise UserError(f"recipe must be one of {', '.join(RECIPES)} (got {name!r})")
        return cls(**{**RECIPES[name], "recipe": name, **changes})


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_problem(name: str, value) -> str | None:
    """Why `value` cannot be TrainConfig's `name`, or None: the one check behind the config, the
    command line's parsed values and hyperparameters.json."""
    meta = FIELDS[name].metadata
    if name == "hidden_units":
        if not isinstance(value, (list, tuple)) or not value or not all(_is(h, numbers.Integral) for h in value):
            return f"must be a list of integers, e.g. [512] (got {quoted(value)})"
        if len(value) > MAX_HIDDEN_LAYERS:
            return f"must have at most {MAX_HIDDEN_LAYERS} layers (got {len(value)})"
        return next(filter(None, map(HIDDEN.problem, value)), None)
    if meta["number"]:
        return meta["number"].problem(value)
    kind = dict if name == "extra" else type(FIELDS[name].default)  # extra's default is a factory
    what = {str: "a string", bool: "True or False", dict: "a dict"}[kind]
    if not _is(value, kind):
        return f"must be {what} (got {quoted(value)})"
    choices = meta["argparse"].get("choices")
    return f"must be one of {', '.join(choices)} (got {quoted(value)})" if choices and value not in choices else None


def flag(name: str) -> str:
    """The command-line flag of TrainConfig's `name`. num_workers is the --workers that several
    commands share, with a default that depends on the machine (`cli.options.SHARED`)."""
    return FIELDS[name].metadata["flag"] or {"num_workers": "--workers"}.get(name) or f"--{name}"


def _is(value, kind) -> bool:
    """isinstance, except that True and False count only as bool, not as numbers."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def load_defaults(path: Path = DEFAULTS_FILE) -> dict:
    """Hyperparameters saved by `search`, or {} when there are none; every value checked as the
    command line checks it, and refused in one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable hyperparameters file ({e}); fix or delete it") from None
    values = values.get("hyperparameters", values) if isinstance(values, dict) else values
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of hyperparameters, e.g. {{\"learning_rate\": 0.001}}; "
                        f"fix or delete it")
    saved = {k: v for k, v in values.items() if k in FIELDS and k != "extra"}
    for name, value in saved.items():
        problem = field_problem(name, value)
        if problem:
            raise UserError(f"{path}: {name} {problem}; fix or delete it")
    return saved


def recipe_problem(name: str) -> str | None:
    """Why RECIPES[name] is not a valid set of options, or None."""
    for key, value in RECIPES[name].items():
        if key not in FIELDS or key == "recipe" or flag(key) != f"--{key}":
            return f"recipe {name}: {key!r} is not an option it can set"
        problem = field_problem(key, value)
        if problem:
            return f"recipe {name}: {key} {problem}"
    return None


# A recipe is code, not user input: a bad one fails at import, before any command runs.
if problems := list(filter(None, map(recipe_problem, RECIPES))):
    raise ValueError("; ".join(problems))
