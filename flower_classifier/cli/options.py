"""What the commands share: a parser that reports a bad option in one line, TrainConfig's options
built from its fields, and the command-line-only options that several commands take."""
from __future__ import annotations

import argparse
import difflib
import os

from ..config import FIELDS, THREADS, WORKERS, TrainConfig, flag
from ..errors import bounded

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming it, not a usage dump; `--learning-rate` is
    `--learning_rate`; an unknown option gets the nearest known one; no abbreviations (`--epoch 3`
    is refused with "did you mean --epochs?", never taken for it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {bounded(message)} (see --help)\n")

    def respell(self, argv: list[str]) -> list[str]:
        """Options spelled with hyphens, as their underscore form when that is one of ours."""
        flags, out = self.flags(), list(argv)
        for i, arg in enumerate(argv):
            if arg == "--":
                break
            name, eq, value = arg.partition("=")
            underscored = "--" + name[2:].replace("-", "_")
            if name.startswith("--") and underscored != name and underscored in flags:
                out[i] = underscored + eq + value
        return out

    # (many, last): positionals that options may split, as in `predict.py A B --top_k 3 C CHECKPOINT`,
    # where argparse gives A to `many`, B to `last` and leaves C and CHECKPOINT over.
    split_positionals: tuple[str, str] | None = None

    def regroup(self, args: argparse.Namespace, extras: list[str]) -> list[str]:
        """Give the positionals left over (see `split_positionals`) to theirs; returns what is still unknown."""
        if not self.split_positionals or any(e.startswith("-") for e in extras):
            return extras  # an unknown option: refused, its value with it
        many, last = self.split_positionals
        tokens = [*getattr(args, many), getattr(args, last), *extras]
        setattr(args, many, tokens[:-1])
        setattr(args, last, tokens[-1])
        return []

    def refuse_unknown(self, extras: list[str]):
        options = [a.partition("=")[0] for a in extras if a.startswith("-")]
        near = difflib.get_close_matches(options[0], self.flags(), n=1) if options else []
        self.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {near[0]}?" if near else ""))

    def flags(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--")]


def require(module: str) -> None:
    """ModuleNotFoundError now if `module` is not installed, without importing it: a Python outside
    the project's environment is told how to set up (`parse_and_run`) before any input is checked."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def add_config_options(p: argparse.ArgumentParser, *names: str, **helps: str) -> None:
    """TrainConfig's fields `names` as options: flag, type, range and help from the field, the
    default from TrainConfig (or from `search`'s file, see `train`); `helps` replace a help text."""
    defaults = TrainConfig()
    for name in names:
        meta, default = FIELDS[name].metadata, getattr(defaults, name)
        text = helps.get(name, meta["help"])
        if meta["argparse"].get("action"):  # an on/off switch
            p.add_argument(flag(name), dest=name, help=text, **meta["argparse"])
            continue
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument(flag(name), dest=name, type=meta["number"].parse if meta["number"] else None,
                       default=list(default) if isinstance(default, tuple) else default,
                       help=f"{text} (default: {shown})", **meta["argparse"])


# Command-line-only arguments that several commands share.
SHARED = {
    "data_dir": dict(help="folder with train/ and valid/ (and test/) split folders of category folders"),
    "--workers": dict(type=WORKERS.parse, default=min(4, os.cpu_count() or 1),
                      help="data-loading worker processes (default: min(4, CPU count))"),
    # None: each stage picks its own (the feature pass shares the cores with the decoders, a small
    # head trains on one thread); applied by `parse_and_run` around the whole command.
    "--threads": dict(type=THREADS.parse, default=None, help="compute threads (torch and ONNX Runtime) for "
                      "everything this command runs (default: chosen per stage by the size of its work)"),
    "--gpu": dict(action="store_true", help="use CUDA or Apple MPS if present (default: CPU)"),
    "--cache_dir": dict(default=None, help="where computed features are kept for later runs (default: "
                        "$FLOWER_CLASSIFIER_CACHE, else ~/.cache/flower_classifier/features)"),
    "--quiet": dict(action="store_true", help="no progress bars"),
    "--category_names": dict(default=None, help="JSON file of category -> flower name"),
    "--negatives": dict(default=None, metavar="DIR", help="a folder of photos that are none of the species (animals, "
                        "objects, food, ...)"),
    "--overwrite": dict(action="store_true", help="replace a file already at the output path; never an input, "
                        "a checkpoint, a link or a folder (default: refuse, unless it is this command's own earlier "
                        "output)"),
    "--tta": dict(action="store_true", help="test-time augmentation: the model also sees each photo mirrored "
                  "left-right, and the two answers are averaged; about twice the time (default: off)"),
}


def add_shared(p: argparse.ArgumentParser, *flags: str, **changes) -> None:
    """The shared arguments `flags`; `changes` (e.g. workers={"help": ...}) adjust one by its name."""
    for f in flags:
        p.add_argument(f, **{**SHARED[f], **changes.get(f.lstrip("-"), {})})


def as_flags(values: dict) -> str:
    """{"hidden_units": [512, 256], "augment": False, ...} as the flags that give them: "--hidden_units
    512 256 --no_augment ..." (a switch turns a True default off, so True needs no flag)."""
    shown = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    return " ".join(flag(k) if isinstance(v, bool) else f"{flag(k)} {shown(v)}"
                    for k, v in values.items() if v is not True)
