"""Run the tutorial notebook top to bottom with some knobs changed, as CI and `make_assets.sh` do.

    python -m flower_classifier.notebook Image_Classifier_Project.ipynb -p ARCH tiny -p EPOCHS 1

The knobs live in the notebook's cell tagged `parameters`; the given values go into a new cell right
after it (tagged `injected-parameters`), so the notebook's own defaults stay as they are. Values are
Python literals (5, 0.01, [256], None) or else plain strings (paths, names). The kernel runs in the
caller's current folder, so relative paths (in `-p` values, the knobs' defaults, `--save_to`) all
mean what they would for any other command run there.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

PARAMETERS_TAG = "parameters"


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def knob_names(source: str) -> list[str]:
    """The names the parameters cell assigns (`NAME = value`), in order; comments and values do not count."""
    return [target.id for statement in ast.parse(source).body if isinstance(statement, ast.Assign)
            for target in statement.targets if isinstance(target, ast.Name)]


def inject_parameters(nb, parameters: dict):
    """Insert `NAME = value` lines after the cell tagged `parameters`; returns the notebook."""
    import nbformat

    index = next((i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])),
                 None)
    if index is None:
        raise ValueError(f"the notebook has no cell tagged {PARAMETERS_TAG!r}")
    # Whole names only: `UNITS` is not a knob just because `HIDDEN_UNITS` is.
    known = knob_names(nb.cells[index].source)
    unknown = [name for name in parameters if name not in known]
    if unknown:
        raise ValueError(f"not knobs of this notebook: {', '.join(unknown)} (its knobs: {', '.join(known)})")
    source = "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def execute_notebook(path: str | Path, parameters: dict | None = None, *, cwd: str | Path | None = None,
                     timeout: int = 600, save_to: str | Path | None = None):
    """Execute the notebook in `cwd` (default: the current folder, so that relative paths mean the
    same in `parameters` as in `save_to`); raises nbclient's CellExecutionError on the first failing
    cell. Returns the executed notebook, also written to `save_to` if given."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(nb, parameters)
    # Let the kernel pick its own inline backend even when the caller forces a headless one.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    # A notebook may import modules that sit next to it, wherever the kernel runs.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.resolve().parent), env.get("PYTHONPATH")]))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or Path.cwd())}})
    try:
        client.execute(env=env)
    finally:
        if save_to is not None:
            Path(save_to).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, save_to)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flower_classifier.notebook", description=__doc__.split("\n")[0])
    parser.add_argument("notebook", help="the .ipynb file to execute")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a knob of the parameters cell (repeatable); "
                             "relative paths are relative to the current folder")
    parser.add_argument("--save_to", default=None, help="write the executed notebook (with outputs) here")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default: 1800)")
    args = parser.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    parameters = {name: parse_value(value) for name, value in args.parameter}
    try:
        execute_notebook(args.notebook, parameters, timeout=args.timeout, save_to=args.save_to)
    except (CellExecutionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"executed {args.notebook}" + (f" -> {args.save_to}" if args.save_to else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
