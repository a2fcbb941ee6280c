"""predict (predict.py): name the flower in photos with a trained model; an .onnx model is predicted
without importing torch. `check_model_file` serves the other commands that take a model too."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..config import Number
from ..errors import UserError
from ..names import names_warnings, read_category_names
from .options import add_shared, require



def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="photos to classify: files, folders (their photos, subfolders included) or quoted globs "
                        "such as 'photos/*.jpg'")
    p.add_argument("checkpoint", help="checkpoint saved by train.py (e.g. checkpoints/checkpoint.pth), or a "
                   "model.onnx from `export` (runs without torch)")
    p.split_positionals = ("images", "checkpoint")  # photos on both sides of an option still count
    # 10,000: more rows than any classifier here has categories; the model's own count is checked later.
    p.add_argument("--top_k", type=Number(int, 1, 10_000).parse, default=None,
                   help="how many classes to show, at most the model's (default: up to 5)")
    add_shared(p, "--category_names", "--gpu", "--tta", category_names={
        "help": "JSON file of category -> flower name (default: the names saved in the checkpoint, else category "
                "numbers)"})
    p.add_argument("--json", action="store_true",
                   help="print JSON, one object per photo: {\"path\", \"unknown\", \"score\", \"predictions\": "
                        "[{\"name\", \"category\", \"probability\"}, ...]}, or {\"path\", \"error\"} for a photo "
                        "that cannot be read; indented for one photo file, one line per photo otherwise")
    p.add_argument("--no_unknown", dest="unknown", action="store_false",
                   help="never answer \"not one of the species\"; probabilities stay calibrated (default: answer it "
                        "when the photo is past the model's threshold)")
    p.add_argument("--csv", metavar="FILE", default=None,
                   help="also write a table to FILE: path, unknown (true: none of the species), score, then name, "
                        "category and probability of each of the top K, and why a skipped photo could not be read "
                        "(default: none)")
    add_shared(p, "--overwrite")


def photo_paths(arguments: list[str]) -> tuple[list[str], list[str]]:
    """The photos that IMAGE arguments name (files, folders' photos, globs' matches), in order and
    each once, and a line for each argument that names none. A URL is refused here, before any model
    loads: predict reads files only."""
    import glob

    from ..images import IMAGE_EXTENSIONS, list_photos

    photos, problems = {}, []
    for argument in arguments:
        path = Path(argument)
        if URL.match(argument):
            raise UserError(f"{argument}: a URL; predict reads photo files only, so download the photo first "
                            f"(e.g. `curl -L -o photo.jpg '{argument}'`) and pass the file")
        if path.is_dir():
            found = [str(p) for p in list_photos(path)]
            if not found:
                problems.append(f"{argument}: a folder without photos ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif path.exists():
            found = [argument]  # whether it is a photo is found when it is read
        elif not glob.has_magic(argument):
            found = []
            problems.append(f"{argument}: no such file")
        else:
            found = sorted(p for p in glob.glob(argument, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{argument}: no file matches (quote a glob, so that the shell leaves it to predict)")
        photos.update(dict.fromkeys(found))
    return list(photos), problems


URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)  # http://, https://, ftp://, s3://, ...

# The Prediction fields that say whether a photo is one of the species, in this order in the JSON
# and the CSV, before the species rows. A field added here (a kind of unknown, say) is in every output.
UNKNOWN_FIELDS = ("unknown", "score")


def unknown_fields(prediction) -> dict:
    """{"unknown": True/False, or None when not asked (no calibration, --no_unknown); "score": the
    unknown score, or None without calibration}: UNKNOWN_FIELDS of the prediction."""
    return {f: getattr(prediction, f, None) for f in UNKNOWN_FIELDS}


def unknown_line(prediction, num_classes: int, threshold: float | None) -> str | None:
    """The answer for a photo that is none of the species the model knows, said first; None otherwise.
    A `kind` on the prediction (what sort of unknown it is) goes after the word "unknown"."""
    if not prediction.unknown:
        return None
    kind = getattr(prediction, "kind", None)
    above = f", above its threshold {threshold:.4g}" if threshold is not None else ""
    return (f"unknown{f' ({kind})' if kind else ''}: not one of the {num_classes} species this model knows "
            f"(score {prediction.score:.4g}{above})")


def run_predict(args: argparse.Namespace) -> int:
    # Everything a user can get wrong in the inputs is said before the model (and torch) loads.
    onnx = args.checkpoint.lower().endswith(".onnx")
    if not onnx:
        require("torch")
    photos, problems = photo_paths(args.images)
    if not photos:
        raise UserError("; ".join(problems))
    table = _check_table(args.csv, [*photos, args.checkpoint, *filter(None, [args.category_names])],
                         args.overwrite) if args.csv else None
    given_names = read_category_names(args.category_names) if args.category_names else None
    check_model_file(args.checkpoint, onnx=onnx)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)

    from ..predictor import check_top_k, load_predictor  # torch only for a checkpoint

    if onnx and args.gpu:
        print("note: .onnx models run on the CPU here; --gpu ignored", file=sys.stderr)
    if not onnx:
        from ..devices import select_device

        device = select_device(args.gpu, log=lambda m: print(m, file=sys.stderr))
    predictor = load_predictor(args.checkpoint, device="cpu" if onnx else device)
    top_k = check_top_k(args.top_k, len(predictor.classes))  # not given: up to 5
    if given_names is not None:
        predictor.cat_to_name, warnings = choose_names(given_names, predictor.cat_to_name, predictor.classes,
                                                       args.category_names)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    threshold = predictor.calibration.threshold if predictor.calibration else None
    single = photos == args.images and len(photos) == 1  # one photo file: today's output, and its error
    results = []
    for result in predictor.predict_many(photos, top_k, unknown=args.unknown, tta=args.tta):
        results.append(result)
        if result.error and single:
            raise UserError(result.error)
        if result.error:
            print(f"warning: skipping {result.error}", file=sys.stderr)
        if args.json:
            answer = {"path": result.photo, **({"error": result.error} if result.error else
                                               {**unknown_fields(result.prediction),
                                                "predictions": [{"name": n, "category": c, "probability": p}
                                                                for n, c, p in result.prediction.rows()]})}
            print(json.dumps(answer, indent=2) if single else json.dumps(answer))
        elif not result.error:
            _print_answer(result.photo, result.prediction, top_k, blank_line=len(results) > 1,
                          unknown=unknown_line(result.prediction, len(predictor.classes), threshold))
        sys.stdout.flush()  # a long run shows each photo as it is done
    if table:
        _write_table(table, results, top_k)
    if predictor.calibration is None and any(not r.error for r in results):
        print(f"note: {args.checkpoint} has no calibration, so its probabilities are uncalibrated and it never answers "
              f"\"not one of the species\"; add it with `python -m flower_classifier calibrate "
              + ("CHECKPOINT.pth DATA_DIR` on the checkpoint it was exported from, then export again" if onnx
                 else f"{args.checkpoint} DATA_DIR`"), file=sys.stderr)
    skipped = sum(1 for r in results if r.error)
    if skipped == len(results):
        raise UserError(f"none of the {len(results)} photos could be read (each is named above)")
    if skipped:
        print(f"{skipped} of {len(results)} photos skipped (each is named above)", file=sys.stderr)
    return 0


def check_model_file(path: str, *, onnx: bool) -> None:
    """A model path where there is nothing, refused in one line before torch or ONNX Runtime loads
    (a folder or a foreign file is named by the loader, which knows what to suggest)."""
    from ..files import check_file

    if not Path(path).exists():
        check_file(path, "model" if onnx else "checkpoint",
                   fix="make one with `python -m flower_classifier export`" if onnx else None)


def choose_names(given: dict[str, str], saved: dict[str, str] | None, classes: list[str],
                 path: str) -> tuple[dict[str, str], list[str]]:
    """The names to show: the --category_names file's, except where it contradicts the names the model
    was trained with (a names file meant for other categories, such as Oxford's 102 for a 5-species
    model): then the model's own, since a daisy printed as "pink primrose" is worse than no file.
    Returns the names and the warnings to print."""
    warnings = names_warnings(given, classes, path, required=True, reference=saved,
                              other="the names the model was trained with",
                              fix="showing the model's own names; leave out --category_names")
    if any(c in given and c in (saved or {}) and given[c] != saved[c] for c in classes):
        return {**given, **saved}, warnings
    return given, warnings


def _print_answer(photo: str, prediction, top_k: int, *, blank_line: bool, unknown: str | None) -> None:
    """The answer first: the species list, or, for a photo that is none of them, the unknown line and
    then the nearest species, labelled as such."""
    print("\n" if blank_line else "", end="")
    if unknown:
        print(f"{photo}: {unknown}")
        print("Nearest species (the photo is none of them):")
    else:
        print(f"Top {top_k} for {photo}:")
    width = max(len(n) for n in prediction.names)
    for rank, (name, category, prob) in enumerate(prediction.rows(), 1):
        label = f"{name:<{width}}  (category {category})" if name != category else f"category {category:<{width}}"
        print(f"{rank:>3}. {label}  {100 * prob:6.2f}%")


def _check_table(path: str, inputs: list[str], overwrite: bool) -> Path:
    """--csv FILE, refused before any work if it cannot be written there or would replace something
    (an input, a checkpoint, a link, another file without --overwrite; see `files.check_output`)."""
    from ..files import check_output

    return check_output(path, option="--csv", inputs=inputs, overwrite=overwrite, ours=_is_table,
                        example="predictions.csv")


def _is_table(path: Path) -> bool:
    """Whether `path` is a table an earlier `--csv` wrote (its header), which a new one may replace."""
    from ..files import head

    header = head(path).split(b"\n", 1)[0]
    return header.startswith(b"path,") and b"probability_1" in header


def _write_table(table: Path, results: list, top_k: int) -> None:
    """One row per photo: its path, whether it is unknown and its score, the top K's names, categories
    and probabilities, or its error. unknown: true, false, or empty when not asked."""
    import csv
    import io

    from ..files import atomic_write

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", *UNKNOWN_FIELDS, *(f"{what}_{rank}" for rank in range(1, top_k + 1)
                                                for what in ("name", "category", "probability")), "error"])
    for r in results:
        fields = {} if r.error else unknown_fields(r.prediction)
        said = [_cell(fields.get(f)) for f in UNKNOWN_FIELDS]
        cells = [] if r.error else [cell for row in r.prediction.rows() for cell in row]
        writer.writerow([r.photo, *said, *cells, *[""] * (3 * top_k - len(cells)), r.error or ""])
    try:
        atomic_write(table, lambda f: f.write(text.getvalue().encode()))
    except OSError as e:
        raise UserError(f"--csv {table}: cannot write it ({e.strerror or e})") from None
    print(f"Wrote {table} ({len(results)} rows)", file=sys.stderr)


def _cell(value) -> str:
    """A CSV cell as pandas and spreadsheets read it back: true/false, a number, or empty for None."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)
