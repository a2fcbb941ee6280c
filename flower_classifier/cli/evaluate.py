"""The commands that measure a checkpoint on a labelled split: evaluate (accuracy, calibration, unknown
figures) and report (per-class table, confusion matrix, figures)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Number
from ..errors import UserError
from .options import add_config_options, add_shared, require
from .predict import check_model_file


def check_split_dir(path: str) -> None:
    """evaluate's and report's split folder where there is none, refused before the checkpoint loads."""
    if not Path(path).is_dir():
        raise UserError(f"{path}: no such directory; expected a split folder such as DATA/test")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """A checkpoint and a labelled split to run it on: shared by `evaluate` and `report`."""
    p.add_argument("checkpoint", help="checkpoint saved by train.py")
    p.add_argument("split_dir", help="a labelled split folder, e.g. flowers/test")
    add_config_options(p, "batch_size", batch_size="images per batch")
    add_shared(p, "--workers", "--threads", "--gpu", "--negatives", "--tta", negatives={
        "help": "a folder of photos that are none of the species, kept apart from any threshold choice: measure how "
                "well the model tells them from its species"})


def run_evaluate(args: argparse.Namespace) -> int:
    require("torch")
    check_model_file(args.checkpoint, onnx=False)
    check_split_dir(args.split_dir)
    from ..devices import select_device
    from ..evaluation import calibration_lines, evaluate_checkpoint

    m = evaluate_checkpoint(args.checkpoint, args.split_dir, device=select_device(args.gpu),
                            batch_size=args.batch_size, num_workers=args.workers, negatives=args.negatives,
                            tta=args.tta)
    print(f"top-1 accuracy: {100 * m['accuracy']:.1f}%  top-5 accuracy: {100 * m['top5']:.1f}%  "
          f"images: {m['count']}  (loss {m['loss']:.4f})")
    print("\n".join(calibration_lines(m)))
    if not m["calibrated"]:
        print(f"{args.checkpoint} has no calibration{' (so no unknown figures)' if args.negatives else ''}: add it "
              f"with `python -m flower_classifier calibrate {args.checkpoint} DATA_DIR`")
    if m.get("skipped"):
        print(f"skipped {m['skipped']} unreadable images (each named in a warning above)")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    add_evaluate_arguments(p)
    p.add_argument("--out", default="report", help="folder for report.txt, per_class.csv and the figures "
                   "(default: report)")
    # A table or a gallery longer than this is unreadable anyway.
    p.add_argument("--top", type=Number(int, 1, 10_000).parse, default=10,
                   help="confused pairs to list (default: 10)")
    p.add_argument("--mistakes", type=Number(int, 1, 1_000).parse, default=8,
                   help="mistakes in the gallery (default: 8)")
    add_shared(p, "--overwrite")


def run_report(args: argparse.Namespace) -> int:
    require("torch")
    check_model_file(args.checkpoint, onnx=False)
    check_split_dir(args.split_dir)
    from ..devices import select_device
    from ..evaluation import REPORT_FILES, report_checkpoint, write_report
    from ..files import check_output_folder, head

    # A folder holding an earlier report (its report.txt) is rewritten; other files need --overwrite.
    check_output_folder(args.out, REPORT_FILES.values(), option="--out", inputs=[args.checkpoint],
                        overwrite=args.overwrite,
                        ours=lambda folder: head(folder / REPORT_FILES["table"]).startswith(b"accuracy "))
    report = report_checkpoint(args.checkpoint, args.split_dir, device=select_device(args.gpu),
                               batch_size=args.batch_size, num_workers=args.workers, negatives=args.negatives,
                               tta=args.tta)
    files = write_report(report, args.out, mistakes=args.mistakes)
    print(report.table(args.top))
    print(f"\nWrote {', '.join(p.name for p in files.values())} to {args.out}")
    return 0
