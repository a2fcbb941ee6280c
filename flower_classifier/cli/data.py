"""The commands around a photo folder: download, check-data, backbones."""
from __future__ import annotations

import argparse

from ..config import MAX_IMBALANCE, Number
from ..names import names_for_run
from .options import add_shared


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
    add_shared(p, "--quiet")


def run_download(args: argparse.Namespace) -> int:
    from ..oxford102 import prepare_oxford102

    counts = prepare_oxford102(args.out_dir, source_dir=args.source, split=args.split, link=args.link,
                               download=not args.no_download, progress=not args.quiet)
    print(f"Oxford 102 ready in {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def add_check_data_arguments(p: argparse.ArgumentParser) -> None:
    # A ratio: >= 1 by definition; beyond a million no split could be balanced enough to pass anyway.
    p.add_argument("--max_imbalance", type=Number(float, 1, 1e6).parse, default=MAX_IMBALANCE,
                   help=f"flag a split whose largest category is this many times its smallest "
                        f"(default: {MAX_IMBALANCE:g})")
    add_shared(p, "data_dir", "--category_names", "--workers", "--quiet", workers={"help": "processes reading images"},
               category_names={"help": "JSON file of category -> flower name to compare with the category folders "
                                       "and the folder's own cat_to_name.json (default: that file, if any)"})


def run_check_data(args: argparse.Namespace) -> int:
    """Exit status 0: safe to train (warnings maybe); 1: problems that break or poison training."""
    from ..datacheck import check_data, format_report

    names, _ = names_for_run(args.category_names, args.data_dir)
    report = check_data(args.data_dir, cat_to_name=names, max_imbalance=args.max_imbalance,
                        workers=args.workers, progress=not args.quiet)
    print("\n".join(format_report(report, args.data_dir)))
    return 0 if report.safe else 1


def run_backbones(args: argparse.Namespace) -> int:
    from ..backbones import BACKBONES, describe

    for spec in BACKBONES.values():
        print(describe(spec))
    return 0
