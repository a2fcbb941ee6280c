"""Category names: the `cat_to_name.json` file that turns category folders ("1".."102") into flower
names, and the checks that catch a names file meant for other categories. Torch-free, so that ONNX
prediction can use it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .errors import UserError


def read_category_names(path: str | Path) -> dict[str, str]:
    """{category folder: flower name} from a JSON file; UserError naming the file if it is not one."""
    path = Path(path)
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


def disagreement_warning(names: Mapping[str, str], reference: Mapping[str, str], classes: list[str],
                         path, other: str) -> str | None:
    """A warning when `names` (from `path`) and `reference` (`other`) both name some categories, but
    differently: a names file meant for another data set. None when they agree."""
    differ = [c for c in classes if c in names and c in reference and names[c] != reference[c]]
    if not differ:
        return None
    c = differ[0]
    return (f"warning: {path} names {len(differ)} of the {len(classes)} categories otherwise than {other} "
            f"(category {c}: {names[c]!r}, not {reference[c]!r})")


def check_names(names: dict[str, str], data_dir: Path, classes: list[str], log) -> None:
    """Warn about categories without a name, and about names that contradict the data folder's own
    cat_to_name.json (the 102 Oxford names given for other categories, say)."""
    missing = [c for c in classes if c not in names]
    if missing:
        log(f"warning: the category names file has no name for {len(missing)} categories "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); their numbers are shown instead")
    own = data_dir / "cat_to_name.json"
    if own.is_file():
        warning = disagreement_warning(names, read_category_names(own), classes, "the category names given", own)
        if warning:
            log(f"{warning}; pass --category_names {own}")
