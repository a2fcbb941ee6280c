"""The commands around the core train/predict loop: evaluate, report, download, check-data,
backbones, export and serve. Each is an `add_*_arguments` / `run_*` pair, listed in `TOOL_COMMANDS`
for `cli` to mount."""
from __future__ import annotations

import argparse

from .cli_args import add_gpu_argument, add_workers_argument, number_type, positive_float, positive_int
from .errors import UserError
from .names import read_category_names


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """A checkpoint and a labelled split to run it on: shared by `evaluate` and `report`."""
    p.add_argument("checkpoint", help="checkpoint saved by train.py")
    p.add_argument("split_dir", help="a labelled split folder, e.g. flowers/test")
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per batch (default: 32)")
    add_workers_argument(p)
    add_gpu_argument(p)


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoint
    from .devices import select_device

    device = select_device(args.gpu)
    m = evaluate_checkpoint(args.checkpoint, args.split_dir, device=device, batch_size=args.batch_size,
                            num_workers=args.workers)
    print(f"top-1 accuracy: {100 * m['accuracy']:.1f}%  top-5 accuracy: {100 * m['top5']:.1f}%  "
          f"images: {m['count']}  (loss {m['loss']:.4f})")
    if m.get("skipped"):
        print(f"skipped {m['skipped']} unreadable images (each named in a warning above)")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    add_evaluate_arguments(p)
    p.add_argument("--out", default="report", help="folder for report.txt, per_class.csv and the figures "
                   "(default: report)")
    p.add_argument("--top", type=positive_int, default=10, help="confused pairs to list (default: 10)")
    p.add_argument("--mistakes", type=positive_int, default=8, help="mistakes in the gallery (default: 8)")


def run_report(args: argparse.Namespace) -> int:
    from .evaluation import report_checkpoint, write_report
    from .devices import select_device

    device = select_device(args.gpu)
    report = report_checkpoint(args.checkpoint, args.split_dir, device=device, batch_size=args.batch_size,
                               num_workers=args.workers)
    files = write_report(report, args.out, mistakes=args.mistakes)
    print(report.table(args.top))
    print(f"\nWrote {', '.join(p.name for p in files.values())} to {args.out}")
    return 0


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", nargs="?", default="flowers", help="where the layout is built (default: flowers)")
    p.add_argument("--source", default=None,
                   help="folder holding 102flowers.tgz, imagelabels.mat, setid.mat (or torchvision's "
                        "Flowers102 root); downloaded there when missing")
    p.add_argument("--split", choices=("original", "classic"), default="original",
                   help="original: Oxford's own setid.mat splits (1020/1020/6149); classic: a fixed 80/10/10 "
                        "shuffle per category, like the course's layout (default: original)")
    p.add_argument("--link", action="store_true", help="hard-link images from an unpacked jpg/ folder")
    p.add_argument("--no_download", action="store_true", help="never use the network; need --source")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_download(args: argparse.Namespace) -> int:
    from .oxford102 import prepare_oxford102

    counts = prepare_oxford102(args.out_dir, source_dir=args.source, split=args.split, link=args.link,
                               download=not args.no_download, progress=not args.quiet)
    print(f"Oxford 102 ready in {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def add_check_data_arguments(p: argparse.ArgumentParser) -> None:
    from .datacheck import MAX_IMBALANCE

    p.add_argument("data_dir", help="folder with train/ and valid/ (and test/) split folders of category folders")
    p.add_argument("--category_names", default=None, help="JSON file of category -> flower name to compare "
                   "with the category folders (default: none)")
    p.add_argument("--max_imbalance", type=positive_float, default=MAX_IMBALANCE,
                   help=f"flag a split whose largest category is this many times its smallest "
                        f"(default: {MAX_IMBALANCE:g})")
    add_workers_argument(p, "processes reading images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_check_data(args: argparse.Namespace) -> int:
    """Exit status 0: safe to train (warnings maybe); 1: problems that break or poison training."""
    from .datacheck import check_data, format_report

    names = read_category_names(args.category_names) if args.category_names else None
    report = check_data(args.data_dir, cat_to_name=names, max_imbalance=args.max_imbalance,
                        workers=args.workers, progress=not args.quiet)
    print("\n".join(format_report(report, args.data_dir)))
    return 0 if report.safe else 1


def run_backbones(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES

    for name, spec in BACKBONES.items():
        p = spec.preprocessing()
        print(f"{name:<18} features {spec.feature_dim:>6}  input {p.input_size}px  mean {p.mean}  std {p.std}  "
              f"{spec.description}; {spec.weights_status()}")
    return 0


# ---------------------------------------------------------------- export, serve

def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint saved by train.py")
    p.add_argument("out", help="ONNX file to write, e.g. model.onnx")


def run_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    path = export_onnx(args.checkpoint, args.out)
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB): try `python predict.py PHOTO {path}` "
          f"or `python -m flower_classifier serve {path}`")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an exported .onnx model (no torch needed) or a checkpoint (.pth)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for other machines "
                   "(default: 127.0.0.1)")
    p.add_argument("--port", type=number_type(int, 1, 65535), default=8000, help="port (default: 8000)")
    p.add_argument("--max_upload_mb", type=positive_float, default=10.0,
                   help="largest photo accepted, in MB (default: 10)")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="model runs at once; each already uses every CPU core (default: 1)")


def run_serve(args: argparse.Namespace) -> int:
    try:
        from .serving import serve
    except ImportError as e:
        raise UserError(f"serving needs the app packages ({e.name} is missing): "
                        f"`pip install -r requirements.txt`") from None
    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, parallel=args.parallel)
    return 0



TOOL_COMMANDS = {
    "evaluate": (add_evaluate_arguments, run_evaluate, "top-1/top-5 accuracy of a checkpoint on a split"),
    "report": (add_report_arguments, run_report,
               "per-class accuracy, confusion matrix, confused pairs and worst mistakes on a split"),
    "download": (add_download_arguments, run_download, "get Oxford 102 in the train/valid/test layout"),
    "check-data": (add_check_data_arguments, run_check_data, "find unreadable, missing, duplicate or unbalanced "
                   "photos before training"),
    "backbones": (lambda p: None, run_backbones, "list the available backbones"),
    "export": (add_export_arguments, run_export, "checkpoint -> one ONNX file for apps (runs without torch)"),
    "serve": (add_serve_arguments, run_serve, "web page and JSON API that name the flower in a photo"),
}

