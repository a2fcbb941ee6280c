"""Command line: `python -m flower_classifier COMMAND` (train, predict, search, evaluate, report,
download, check-data, backbones, export, serve) and the classic `train.py` / `predict.py`, all thin
layers over the library. Mistakes a user can make end in one line on stderr and exit status 2, never
a traceback.

This module holds the core loop's commands (train, search, predict) and the entry points;
`cli_tools` the others, `cli_args` what they share.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .cli_args import (EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, add_gpu_argument, add_workers_argument,
                       non_negative_float, non_negative_int, number_type, positive_float, positive_int)
from .cli_tools import TOOL_COMMANDS
from .config import DEFAULTS_FILE, TrainConfig, load_defaults
from .errors import Interrupted, UserError
from .names import disagreement_warning, read_category_names


# ---------------------------------------------------------------- train

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("data_dir", help="folder with train/ and valid/ (and test/) split folders of category folders")
    p.add_argument("--save_dir", default="checkpoints", help="where checkpoints go (default: checkpoints)")
    p.add_argument("--arch", default=d.arch, help=f"backbone (default: {d.arch}); see `python -m "
                   "flower_classifier backbones`")
    p.add_argument("--learning_rate", type=positive_float, default=d.learning_rate,
                   help=f"head learning rate (default: {d.learning_rate})")
    p.add_argument("--hidden_units", type=positive_int, nargs="+", default=list(d.hidden_units),
                   help=f"hidden layer size(s) of the head, e.g. 1024 256 (default: {d.hidden_units[0]})")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"epochs (default: {d.epochs})")
    add_gpu_argument(p)
    p.add_argument("--batch_size", type=positive_int, default=d.batch_size,
                   help=f"images per step (default: {d.batch_size})")
    p.add_argument("--dropout", type=number_type(float, 0, 0.99), default=d.dropout,
                   help=f"dropout in the head (default: {d.dropout})")
    p.add_argument("--weight_decay", type=non_negative_float, default=d.weight_decay,
                   help=f"AdamW weight decay (default: {d.weight_decay})")
    p.add_argument("--label_smoothing", type=number_type(float, 0, 0.99), default=d.label_smoothing,
                   help=f"cross-entropy label smoothing (default: {d.label_smoothing})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    add_workers_argument(p, dest="num_workers")
    p.add_argument("--no_augment", dest="augment", action="store_false",
                   help="centre crops only: no random crop, rotation, flip (classic loop) and no augmented "
                        "views (cached path)")
    p.add_argument("--classic", dest="feature_cache", action="store_false",
                   help="run the backbone on every image in every epoch, augmenting afresh each time: the slow "
                        "reference loop (default: compute each image's features once and train on them)")
    p.add_argument("--augmented_views", type=non_negative_int, default=d.augmented_views,
                   help="cached path: augmented copies of each training image, computed once, besides its "
                        f"centre crop (default: {d.augmented_views})")
    add_cache_argument(p)
    p.add_argument("--category_names", default=None,
                   help="JSON file of category -> flower name to store in the checkpoint (default: none)")
    p.add_argument("--resume", nargs="?", const="__save_dir__", default=None,
                   help="continue from --save_dir's last checkpoint, or from the given last.pth")
    p.add_argument("--defaults", default=str(DEFAULTS_FILE),
                   help=f"hyperparameters file written by `search`, read for defaults (default: {DEFAULTS_FILE})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache_dir", default=None,
                   help="where computed features are kept for later runs (default: $FLOWER_CLASSIFIER_CACHE, "
                        "else ~/.cache/flower_classifier/features)")


def _apply_saved_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Let `search`'s best values replace the built-in defaults; flags on the command line still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--defaults", default=None)
    known, _ = pre.parse_known_args(argv)
    path = Path(known.defaults or DEFAULTS_FILE)
    if known.defaults and not path.is_file():
        raise UserError(f"--defaults {path}: no such file; run `search` to write one, or drop --defaults")
    saved = load_defaults(path)
    if saved:
        if "hidden_units" in saved:
            saved["hidden_units"] = list(saved["hidden_units"])
        parser.set_defaults(**saved, saved_defaults=(path, saved))


def _say_saved_defaults(args: argparse.Namespace) -> None:
    """Name the values a hyperparameters file supplied, so that a run never changes unannounced."""
    path, saved = getattr(args, "saved_defaults", None) or (None, {})
    used = {k: v for k, v in saved.items() if getattr(args, k, None) == v}
    if used:
        flags = " ".join(f"--{'workers' if k == 'num_workers' else k} "
                         f"{' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in used.items())
        print(f"Defaults from {path} (written by `search`): {flags}; flags given here win")


def run_train(args: argparse.Namespace) -> int:
    from .devices import select_device
    from .training import run_training

    config = TrainConfig(arch=args.arch, hidden_units=tuple(args.hidden_units), dropout=args.dropout,
                         learning_rate=args.learning_rate, weight_decay=args.weight_decay, epochs=args.epochs,
                         batch_size=args.batch_size, seed=args.seed, num_workers=args.num_workers,
                         label_smoothing=args.label_smoothing, augment=args.augment,
                         feature_cache=args.feature_cache, augmented_views=args.augmented_views)
    from . import distributed
    from .backbones import get_spec

    # run_training checks these too; here they come before the device note and torchrun's start-up.
    get_spec(config.arch)
    if distributed.is_main():
        _say_saved_defaults(args)
    names = read_category_names(args.category_names) if args.category_names else None
    device = select_device(args.gpu)
    if distributed.launched():  # started by torchrun: join the other processes
        device = distributed.init(device)
    main_process = distributed.is_main()
    resume = args.resume
    if resume == "__save_dir__":
        resume = args.save_dir
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: finished epochs are already saved.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result = run_training(config, args.data_dir, save_dir=args.save_dir, device=device, cat_to_name=names,
                              resume=resume, cache_dir=args.cache_dir, progress=not args.quiet and main_process,
                              log=print if main_process else (lambda message: None))
    finally:
        distributed.cleanup()
    best = max(result.state.history, key=lambda h: h["valid_accuracy"]) if result.state.history else None
    if best and main_process:
        size_mb = result.best_path.stat().st_size / 1e6
        saved = "Saved" if result.epochs_run else "Kept in"
        print(f"Best epoch {best['epoch']}: valid accuracy {100 * best['valid_accuracy']:.1f}%. "
              f"{saved} {result.best_path} ({size_mb:.1f} MB); last epoch in {result.last_path}")
    return 0


# ---------------------------------------------------------------- search

def add_search_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("data_dir", help="folder with train/ and valid/ split folders of category folders")
    p.add_argument("--trials", type=positive_int, default=30, help="head trainings to try (default: 30)")
    p.add_argument("--arch", default=d.arch, help=f"backbone (default: {d.arch})")
    p.add_argument("--augmented_views", type=non_negative_int, default=d.augmented_views,
                   help=f"augmented copies per training image, as in train.py (default: {d.augmented_views})")
    add_cache_argument(p)
    p.add_argument("--seed", type=int, default=d.seed, help=f"seeds the search and every trial (default: {d.seed})")
    p.add_argument("--out", default=str(DEFAULTS_FILE),
                   help=f"where the best values go; train.py reads them as defaults (default: {DEFAULTS_FILE})")
    add_workers_argument(p, "data-loading worker processes for feature extraction")
    add_gpu_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_search(args: argparse.Namespace) -> int:
    from .backbones import build_backbone, get_spec
    from .data import split_dir
    from .features import load_feature_data
    from .search import SEARCHED, random_search, save_best
    from .devices import select_device

    get_spec(args.arch)
    for split in ("train", "valid"):
        split_dir(args.data_dir, split)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    device = select_device(args.gpu)
    base = TrainConfig(arch=args.arch, seed=args.seed, augmented_views=args.augmented_views,
                       num_workers=args.workers)
    data = load_feature_data(args.data_dir, build_backbone(args.arch), augmented_views=args.augmented_views,
                             cache_dir=args.cache_dir, device=device, num_workers=args.workers,
                             progress=not args.quiet)
    results = random_search(data, base, trials=args.trials, seed=args.seed, device=device,
                            progress=not args.quiet)
    best = results[0]
    save_best(results, base, out, data_dir=args.data_dir)
    print(f"Best of {len(results)} trials: valid accuracy {100 * best['valid_accuracy']:.1f}% (trial "
          f"{best['trial']}; trial 0 = the built-in defaults, {100 * _trial0(results):.1f}%)")
    print("  " + "  ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                           for k, v in best["params"].items() if k in SEARCHED))
    if out.resolve() == DEFAULTS_FILE.resolve():
        print(f"Saved to {out}: train.py run from this folder now uses these as its defaults (flags still win)")
    else:
        print(f"Saved to {out}: pass `--defaults {out}` to train.py to use them as its defaults")
    return 0


def _trial0(results: list[dict]) -> float:
    return next(r["valid_accuracy"] for r in results if r["trial"] == 0)


# ---------------------------------------------------------------- predict

def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="photo to classify")
    p.add_argument("checkpoint", help="checkpoint saved by train.py (e.g. checkpoints/checkpoint.pth), or a "
                   "model.onnx from `export` (runs without torch)")
    p.add_argument("--top_k", type=positive_int, default=None,
                   help="how many classes to show, at most the model's (default: up to 5)")
    p.add_argument("--category_names", default=None,
                   help="JSON file of category -> flower name (default: the names saved in the checkpoint, "
                        "else category numbers)")
    add_gpu_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def check_names_match(names: dict[str, str], classes: list[str], path: str,
                      saved: dict[str, str] | None = None) -> list[str]:
    """Warnings for a names file that only partly covers the model's categories, or that names them
    otherwise than the file the model was trained with; an error if it names none of them."""
    missing = [c for c in classes if c not in names]
    if len(missing) == len(classes):
        raise UserError(f"--category_names {path} names none of the model's categories "
                        f"({', '.join(classes[:5])}...); pass the names file the model was trained with")
    warnings = [f"warning: {path} has no name for categories {', '.join(missing[:5])}"] if missing else []
    differ = disagreement_warning(names, saved or {}, classes, path, "the names the model was trained with")
    if differ:
        warnings.append(f"{differ}; leave out --category_names to use the trained names")
    return warnings


def run_predict(args: argparse.Namespace) -> int:
    from .predictor import check_top_k, load_predictor  # torch only for a checkpoint

    onnx = args.checkpoint.lower().endswith(".onnx")
    if onnx and args.gpu:
        print("note: .onnx models run on the CPU here; --gpu ignored", file=sys.stderr)
    if not onnx:
        from .devices import select_device

        device = select_device(args.gpu, log=lambda m: print(m, file=sys.stderr))
    predictor = load_predictor(args.checkpoint, device="cpu" if onnx else device)
    top_k = check_top_k(args.top_k, len(predictor.classes))  # not given: up to 5
    if args.category_names:
        saved, predictor.cat_to_name = predictor.cat_to_name, read_category_names(args.category_names)
        for w in check_names_match(predictor.cat_to_name, predictor.classes, args.category_names, saved):
            print(w, file=sys.stderr)
    result = predictor.predict(args.image, top_k)
    if args.json:
        print(json.dumps([{"name": n, "category": c, "probability": p} for n, c, p in result.rows()], indent=2))
        return 0
    width = max(len(n) for n in result.names)
    print(f"Top {top_k} for {args.image}:")
    for rank, (name, category, prob) in enumerate(result.rows(), 1):
        label = f"{name:<{width}}  (category {category})" if name != category else f"category {category:<{width}}"
        print(f"{rank:>3}. {label}  {100 * prob:6.2f}%")
    return 0



COMMANDS = {
    "train": (add_train_arguments, run_train, "train a head on a photo folder"),
    "predict": (add_predict_arguments, run_predict, "name the flower in a photo"),
    "search": (add_search_arguments, run_search, "search head hyperparameters on cached features"),
    **TOOL_COMMANDS,
}


def build_parser(prog: str = "flower_classifier") -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser and its subcommand parsers by name."""
    parser = Parser(prog=prog, description="Flower species classifier by transfer learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    subparsers = {}
    for name, (add_args, run, help_text) in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        add_args(subparsers[name])
    return parser, subparsers


def _run(run, args) -> int:
    try:
        code = run(args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside this try
        return code
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush has somewhere to go
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):  # else what was saved has been said already
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    try:
        if argv and argv[0] == "train":
            _apply_saved_defaults(subparsers["train"], argv[1:])
        args = parser.parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return _run(COMMANDS[args.command][1], args)


def single_command_main(command: str, prog: str, argv: list[str] | None = None) -> int:
    """`train.py` / `predict.py`: one subcommand as its own program."""
    argv = list(sys.argv[1:] if argv is None else argv)
    add_args, run, help_text = COMMANDS[command]
    parser = Parser(prog=prog, description=help_text)
    add_args(parser)
    try:
        if command == "train":
            _apply_saved_defaults(parser, argv)
        args = parser.parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return _run(run, args)
