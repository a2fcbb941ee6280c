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


_NESTED = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)  # scopes of their own


def _statement_flow(statement: ast.stmt) -> tuple[set[str], set[str]]:
    """(the names a top-level statement reads, the names it binds). A function reads what its body
    reads but does not bind itself; the variables of a comprehension or lambda are not the cell's."""
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return set(), {(a.asname or a.name).split(".")[0] for a in statement.names}
    names = [n for n in ast.walk(statement) if isinstance(n, ast.Name)]
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        local = {a.arg for a in ast.walk(statement) if isinstance(a, ast.arg)}
        local |= {n.id for n in names if not isinstance(n.ctx, ast.Load)}
        return {n.id for n in names if isinstance(n.ctx, ast.Load)} - local, {statement.name}
    nested = {id(n) for scope in ast.walk(statement) if isinstance(scope, _NESTED)
              for n in ast.walk(scope) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    binds = {n.id for n in names if not isinstance(n.ctx, ast.Load) and id(n) not in nested}
    inner = {n.id for n in names if id(n) in nested}
    if isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign)):  # the value is read before the binding
        return {n.id for n in names if isinstance(n.ctx, ast.Load)} - inner, binds
    # A loop or block: a name bound before it is read (a loop variable) is not read from before the cell.
    first: dict[str, bool] = {}
    for n in sorted(names, key=lambda n: (n.lineno, n.col_offset)):
        first.setdefault(n.id, isinstance(n.ctx, ast.Load))
    return {name for name, load in first.items() if load} - inner, binds


def cell_flow(source: str | ast.AST) -> tuple[set[str], dict[str, set[str]]]:
    """(the names a cell reads from before it ran, and for each name it binds, the names from before
    it that went into it), statement by statement: `fig = show(photo)` depends on `photo`, not on
    everything else the cell reads."""
    tree = ast.parse(source) if isinstance(source, str) else source
    outside: set[str] = set()
    made: dict[str, set[str]] = {}
    for statement in tree.body:
        reads, binds = _statement_flow(statement)
        sources = set()
        for name in reads:
            if name in made:
                sources |= made[name]
            else:
                sources.add(name)
                outside.add(name)
        for name in binds:
            made[name] = sources | (made.get(name, set()) if isinstance(statement, ast.AugAssign) else set())
    return outside, made


@dataclass
class Made:
    cell: int  # the execution count of the cell that made it, as Jupyter shows it: In [cell]
    inputs: dict[str, tuple[int, int]]  # the names it was made from -> (their version then, the cell that read it)


class CellWatch:
    """What made each name of a namespace, updated after every cell; see the module docstring."""

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.version: dict[str, int] = {}  # name -> how many times it was made; a knob -> which of its values
        self.made: dict[str, Made] = {}
        self.knob_values: dict[str, list] = {}  # knob -> the values it has held
        self.before: dict[str, int] | None = None  # id() of each name's value when the running cell started
        self.flow: tuple[set[str], dict[str, set[str]]] = (set(), {})  # the running cell's `cell_flow`
        self.note_knobs()

    def note_knobs(self) -> None:
        """A knob's version is which of its values it holds: set back as it was, it is what it was."""
        for name, value in list(self.namespace.items()):
            if not (is_knob(name) and _tracked(name)):
                continue
            seen = self.knob_values.setdefault(name, [])
            version = next((i for i, old in enumerate(seen) if _equal(old, value)), None)
            if version is None:
                try:
                    seen.append(copy.deepcopy(value))  # a copy: a list edited in place is a new value
                except Exception:
                    seen.append(value)
                version = len(seen) - 1
            self.version[name] = version

    def changed(self, name: str, seen: set[str]) -> set[str]:
        """The knobs and names, among those `name` was made from (directly or not), changed since."""
        made, causes = self.made.get(name), set()
        for source, (version, _) in (made.inputs.items() if made else ()):
            if self.version.get(source, 0) != version:
                causes.add(source)
            elif source not in seen:
                seen.add(source)
                causes |= self.changed(source, seen)
        return causes

    def problem(self, source: str | ast.AST) -> str | None:
        """Why a cell with this code must not run now, in one line, or None."""
        self.note_knobs()  # a knob assigned outside the knobs cell counts too
        stale = {name: self.changed(name, set()) for name in sorted(cell_flow(source)[0]) if _tracked(name)}
        stale = {name: causes for name, causes in stale.items() if causes}
        if not stale:
            return None
        # The learner's own change first: a knob edited, else the name made again.
        name, cause = min(((n, c) for n, causes in stale.items() for c in causes), key=lambda nc: (not is_knob(nc[1]), nc))
        first = min(cell for m in self.made.values() for source, (version, cell) in m.inputs.items()
                    if source == cause and version != self.version[cause])
        what = f"{cause} changed" if is_knob(cause) else f"`{cause}` was made again (cell [{self.made[cause].cell}])"
        return (f"{what} after cell [{first}] used it, and this cell reads `{name}`, made from the old "
                f"{'value' if is_knob(cause) else 'one'}: run the cells from [{first}] down to this one "
                f"again, in order (or Kernel → Restart Kernel and Run All Cells)")

    def start(self, tree: ast.Module) -> None:
        self.before = {name: id(value) for name, value in self.namespace.items()}
        self.flow = cell_flow(tree)

    def finish(self, cell: int) -> None:
        """After a cell ran (or failed part way): what it (re)made, and from what. A cell refused by
        `problem` (or run before the watch began) made nothing."""
        self.note_knobs()
        if self.before is None:
            return
        remade = [name for name, value in self.namespace.items()
                  if _tracked(name) and not is_knob(name) and self.before.get(name) != id(value)]
        outside, made = self.flow
        prior = {name: self.made.get(name) for name in remade}

        def versions(sources: set[str]) -> dict[str, tuple[int, int]]:
            out = {}
            for source in sorted(sources):
                if source in prior:  # read as it was before this cell made it again: what that was made from
                    out.update(prior[source].inputs if prior[source] else {})
                elif _tracked(source) and source in self.namespace:
                    out[source] = (self.version.get(source, 0), cell)
            return out

        # A name changed without being assigned (by a call) counts as made from all the cell read.
        inputs = {name: versions(made.get(name, outside)) for name in remade}
        for name in remade:
            self.version[name] = self.version.get(name, 0) + 1
            self.made[name] = Made(cell, inputs[name])
        self.before, self.flow = None, (set(), {})


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
        self.watch.before, self.watch.flow = None, (set(), {})
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
