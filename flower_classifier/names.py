"""Category names: the `cat_to_name.json` file that turns category folders ("1".."102") into flower
names, and the checks that catch a names file meant for other categories. Torch-free, so that ONNX
prediction can use it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .errors import UserError, quoted
from .files import check_regular_file


def read_category_names(path: str | Path) -> dict[str, str]:
    """{category folder: flower name} from a JSON file; UserError naming the file if it is not one."""
    path = check_regular_file(path, "--category_names")  # a FIFO would block read_text
    try:
        names = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--category_names {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--category_names {path}: not a JSON file ({e})") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise UserError(f"--category_names {path}: expected a JSON object {{\"category\": \"flower name\"}}")
    return {str(k): v for k, v in names.items()}


def as_category_names(names: Mapping | str | Path | None) -> dict[str, str] | None:
    """A names mapping from a mapping or a JSON file's path; keys as strings (folder names)."""
    if names is None:
        return None
    if isinstance(names, (str, Path)):
        return read_category_names(names)
    if not isinstance(names, Mapping):
        raise UserError(f"category names must be a dict or a JSON file's path (got {type(names).__name__})")
    return {str(k): str(v) for k, v in names.items()}


OWN_NAMES = "cat_to_name.json"  # a data folder's own names file, used when none is given


def folder_names(data_dir: str | Path) -> tuple[dict[str, str] | None, Path | None]:
    """The names a data folder carries in its own cat_to_name.json, and that file (None, None without one)."""
    own = Path(data_dir) / OWN_NAMES
    return (read_category_names(own), own) if own.is_file() else (None, None)


def names_for_run(given: str | Path | None, data_dir: str | Path) -> tuple[dict[str, str] | None, str]:
    """The names a run uses: the file given, else the data folder's own; and a line saying which."""
    if given:
        return read_category_names(given), f"Category names: {given}"
    names, own = folder_names(data_dir)
    if names is not None:
        return names, f"Category names: {own} (the data folder's own; --category_names FILE to use another)"
    return None, "Category names: none (category numbers are shown; --category_names FILE to name them)"


def names_warnings(names: Mapping[str, str], classes: list[str], path, *, required: bool = False,
                   every: set[str] | None = None,
                   reference: Mapping[str, str] | None = None, other: str = "", fix: str = "") -> list[str]:
    """The one check of a names file (`path`: how to call it) against the categories `classes`: what
    it misses, names for categories in none of `every`, and names that contradict `reference` (what
    `other` calls it: a names file meant for another data set; `fix` says what to do). Warnings
    without the "warning: "; with `required`, naming none of them is an error."""
    warnings = []
    missing = [c for c in classes if c not in names]
    if required and len(missing) == len(classes):
        raise UserError(f"--category_names {path} names none of the model's categories "
                        f"({_listing(classes)}); pass the names file the model was trained with")
    if missing:
        warnings.append(f"{path}: no name for {len(missing)} categor{'y' if len(missing) == 1 else 'ies'} "
                        f"({_listing(missing)}); their numbers are shown instead")
    extra = sorted((c for c in names if every is not None and c not in every), key=lambda c: (len(c), c))  # 2 < 10
    if extra:
        warnings.append(f"{path}: {len(extra)} name{'s' * (len(extra) != 1)} for categories that no split has "
                        f"({_listing(extra)})")
    differ = [c for c in classes if c in names and c in (reference or {}) and names[c] != reference[c]]
    if differ:
        c = differ[0]
        warnings.append(f"{path} names {len(differ)} of the {len(classes)} categories otherwise than {other} "
                        f"(category {c}: {quoted(names[c])}, not {quoted(reference[c])})" + (f"; {fix}" if fix else ""))
    return warnings


def check_names(names: dict[str, str], data_dir: Path, classes: list[str], log) -> None:
    """Training's names check: warnings for what the names miss, and for names that contradict the
    data folder's own cat_to_name.json (the 102 Oxford names given for other categories, say)."""
    own_names, own = folder_names(data_dir)
    for warning in names_warnings(names, classes, "the category names given", reference=own_names, other=own,
                                  fix=f"pass --category_names {own}"):
        log(f"warning: {warning}")


def _listing(items: list, limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
