"""The tutorial notebook's bookkeeping, kept out of its cells so that a learner reads the steps:
where the photos are (Oxford 102, or the shared sample when it is absent), which backbone can be had
(the one asked for, or one that works offline), which device DEVICE means, and the one guard
against cells run out of order (`watch_cells`).

The guard follows which cell made each name from which others, as a build tool follows files.
Before a cell runs, if a name it reads was made from a knob (an UPPER_CASE name) whose value has
changed since, or from a name that has been made again since, the cell stops with one line saying
which cells to run again: objects from old and new settings never mix silently (a head trained on
one backbone's features saved under another's name, say).
"""
from __future__ import annotations

import ast
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import OFFLINE_CHOICE, Backbone, build_backbone, get_spec
from .data import split_dir
from .devices import mps_available
from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
OXFORD_DIR = "flowers"  # DATA_DIR's default: where `python -m flower_classifier download flowers` puts Oxford 102
SAMPLE = Path("shared", "data", "flower_photos_sample")  # looked for beside this folder and its parents


def pick_device(name: str) -> torch.device:
    """The DEVICE knob as a device: "auto" is the GPU when there is one; a GPU this machine lacks
    means the CPU, with a note, as `train.py --gpu` does."""
    if name not in DEVICES:
        raise UserError(f'DEVICE must be "auto", "cpu", "cuda" or "mps" (got {name!r})')
    present = {"cuda": torch.cuda.is_available(), "mps": mps_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, here in present.items() if here))
    if not present[name]:
        print(f"DEVICE = {name!r}: this machine has no {name} device, so everything runs on the CPU")
        return torch.device("cpu")
    return torch.device(name)


def find_data(data_dir: str | Path) -> Path:
    """The data folder to use: DATA_DIR; or, when it is the default Oxford 102 folder and that is
    absent, the shared 300-photo sample (found beside the current folder or one of its parents), said
    in one line. Otherwise a missing folder stops here, saying how to get the data."""
    path = Path(data_dir)
    if str(data_dir) == OXFORD_DIR and not path.exists():
        here = Path.cwd()
        sample = next((p / SAMPLE for p in here.parents if (p / SAMPLE).is_dir()), None)
        if sample is not None:
            shown = Path(os.path.relpath(sample, here))
            print(f"{OXFORD_DIR}/ (Oxford 102) is not here, so this run uses the 300-photo sample in {shown}; "
                  f"`python -m flower_classifier download flowers` fetches Oxford 102")
            path = shown
    split_dir(path, "train")  # a missing folder or split: one line saying how to get the data
    return path


def load_backbone(arch: str) -> Backbone:
    """The frozen pretrained backbone `arch`; when its weights cannot be downloaded (no internet),
    the offline one (`backbones.OFFLINE_CHOICE`, weights installed with pip), said in one line."""
    get_spec(arch)  # an unknown name stops here, with the list of known ones
    try:
        return build_backbone(arch)
    except UserError as e:
        if arch == OFFLINE_CHOICE:
            raise
        print(f"ARCH = {arch!r}: {e}\nSo this run uses {OFFLINE_CHOICE}, whose weights came with pip "
              f"(set ARCH = {OFFLINE_CHOICE!r} to skip the attempt)")
        return build_backbone(OFFLINE_CHOICE)


# ---------------------------------------------------------------- the out-of-order guard

IGNORED = {"In", "Out", "exit", "quit", "get_ipython"}  # IPython's own names, which change every cell


def is_knob(name: str) -> bool:
    return name.isupper()


def _tracked(name: str) -> bool:
    return not name.startswith("_") and name not in IGNORED


def _equal(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # values whose == is not a yes or no (arrays): compare by identity
        return a is b


def reads(source: str | ast.AST) -> set[str]:
    """The names a cell reads before it assigns them itself, in source order (close enough for
    notebook cells: `x = f(x)` counts as assigning first)."""
    tree = ast.parse(source) if isinstance(source, str) else source
    names = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Name)), key=lambda n: (n.lineno, n.col_offset))
    assigned, read = set(), set()
    for n in names:
        if isinstance(n.ctx, ast.Load) and n.id not in assigned:
            read.add(n.id)
        elif not isinstance(n.ctx, ast.Load):
            assigned.add(n.id)
    return read


@dataclass
class Made:
    cell: int  # the execution count of the cell that made it, as Jupyter shows it: In [cell]
    inputs: dict[str, int]  # the names it was made from -> their version then


class CellWatch:
    """What made each name of a namespace, updated after every cell; see the module docstring."""

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.version: dict[str, int] = {}  # name -> how many times it was made (a knob: its value changed)
        self.made: dict[str, Made] = {}
        self.knob_values: dict[str, object] = {}
        self.before: dict[str, int] = {}  # id() of each name's value when the running cell started
        self.read: set[str] = set()  # the names the running cell reads
        self.note_knobs()

    def note_knobs(self) -> None:
        for name, value in list(self.namespace.items()):
            if is_knob(name) and _tracked(name) and not (
                    name in self.knob_values and _equal(self.knob_values[name], value)):
                try:
                    self.knob_values[name] = copy.deepcopy(value)
                except Exception:
                    self.knob_values[name] = value
                self.version[name] = self.version.get(name, 0) + 1

    def changed(self, name: str, seen: set[str]) -> str | None:
        """The knob or name, among those `name` was made from (directly or not), changed since."""
        made = self.made.get(name)
        for source, version in (made.inputs.items() if made else ()):
            if self.version.get(source, 0) != version:
                return source
            if source not in seen:
                seen.add(source)
                cause = self.changed(source, seen)
                if cause:
                    return cause
        return None

    def problem(self, source: str | ast.AST) -> str | None:
        """Why a cell with this code must not run now, in one line, or None."""
        self.note_knobs()  # a knob assigned outside the knobs cell counts too
        for name in sorted(reads(source)):
            cause = self.changed(name, set()) if _tracked(name) else None
            if cause:
                users = [m.cell for m in self.made.values() if m.inputs.get(cause, self.version[cause]) != self.version[cause]]
                first = min(users)
                what = (f"{cause} changed" if is_knob(cause)
                        else f"`{cause}` was made again (cell [{self.made[cause].cell}])")
                return (f"{what} after cell [{first}] used it, and this cell reads `{name}`, made from the old "
                        f"{'value' if is_knob(cause) else 'one'}: run the cells from [{first}] down to this one "
                        f"again, in order (or Kernel → Restart Kernel and Run All Cells)")
        return None

    def start(self, tree: ast.Module) -> None:
        self.before = {name: id(value) for name, value in self.namespace.items()}
        self.read = reads(tree)

    def finish(self, cell: int) -> None:
        """After a cell ran (or failed part way): what it (re)made, and from what."""
        self.note_knobs()
        remade = [name for name, value in self.namespace.items()
                  if _tracked(name) and not is_knob(name) and self.before.get(name) != id(value)]
        for name in remade:
            self.version[name] = self.version.get(name, 0) + 1
        inputs = {name: self.version.get(name, 0) for name in self.read if _tracked(name) and name in self.namespace}
        for name in remade:
            self.made[name] = Made(cell, {k: v for k, v in inputs.items() if k != name})
        self.before, self.read = {}, set()


class _Guard(ast.NodeTransformer):
    """IPython runs every cell's syntax tree through this before running it: a cell that would mix
    old and new objects becomes one that raises the UserError saying so."""

    def __init__(self, watch: CellWatch):
        self.watch = watch

    def visit(self, node):
        if not isinstance(node, ast.Module):
            return node
        problem = self.watch.problem(node)
        if problem is None:
            self.watch.start(node)
            return node
        self.watch.before, self.watch.read = {}, set()
        stop = ast.parse(f"raise __import__('flower_classifier.errors', fromlist=['UserError']).UserError({problem!r})")
        return ast.fix_missing_locations(stop)


def watch_cells(namespace: dict) -> None:
    """Guard every cell run from now on in this IPython kernel (once: calling again changes nothing).
    Outside IPython (a script exec'ing cells) it does nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or any(isinstance(t, _Guard) for t in shell.ast_transformers):
        return
    watch = CellWatch(namespace)
    shell.ast_transformers.append(_Guard(watch))
    shell.events.register("post_run_cell", lambda result: watch.finish(result.execution_count))
