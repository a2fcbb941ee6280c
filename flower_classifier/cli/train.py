"""`train` (train.py) and `search`: the commands that fit a head."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from ..config import DEFAULTS_FILE, FIELDS, RECIPES, Number, TrainConfig, flag, load_defaults, recipe_flags
from ..errors import UserError
from ..hub import check_weights_reachable
from ..names import names_for_run
from .options import add_config_options, add_shared, as_flags, require


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_shared(p, "data_dir")
    p.add_argument("--save_dir", default="checkpoints", help="where checkpoints go (default: checkpoints)")
    add_config_options(p, *(name for name, f in FIELDS.items() if f.metadata["flag"] != ""))  # all of them
    add_shared(p, "--gpu", "--workers", "--threads", "--cache_dir", "--category_names", "--quiet",
               workers={"dest": "num_workers"},
               category_names={"help": "JSON file of category -> flower name to store in the checkpoint (default: "
                               "DATA_DIR/cat_to_name.json when there is one, else none)"})
    add_shared(p, "--negatives", negatives={"help": "a folder of photos that are none of the species: choose the "
                                            "unknown threshold with them too (default: from the species photos alone)"})
    p.add_argument("--resume", nargs="?", const="__save_dir__", default=None,
                   help="continue from --save_dir's last checkpoint, or from the given last.pth")
    p.add_argument("--test", action="store_true", help="at the end, evaluate the best epoch on DATA_DIR/test and put "
                   "its figures in the model card (default: off; the card then reports the validation split)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log each epoch for TensorBoard in DIR (needs `pip install tensorboard`; default: off)")
    p.add_argument("--defaults", default=str(DEFAULTS_FILE),
                   help=f"hyperparameters file written by `search`, read for defaults (default: {DEFAULTS_FILE})")


def apply_saved_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Let --recipe's values, then `search`'s best values, replace the built-in defaults; flags on the
    command line still win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--defaults", default=None)
    pre.add_argument(flag("recipe"), dest="recipe", default=TrainConfig().recipe)
    known, _ = pre.parse_known_args(argv)
    if known.recipe in RECIPES:  # an unknown name is refused by the parser itself, in one line
        parser.set_defaults(**RECIPES[known.recipe])
    path = Path(known.defaults or DEFAULTS_FILE)
    if known.defaults and not path.is_file():
        raise UserError(f"--defaults {path}: no such file; run `search` to write one, or drop --defaults")
    saved = load_defaults(path)
    if saved:
        parser.set_defaults(**saved, saved_defaults=(path, saved))


def _say_saved_defaults(args: argparse.Namespace) -> None:
    """Name the values a hyperparameters file supplied, so that a run never changes unannounced."""
    path, saved = getattr(args, "saved_defaults", None) or (None, {})
    used = {k: v for k, v in saved.items() if getattr(args, k, None) == v}
    if used:
        print(f"Defaults from {path} (written by `search`): {as_flags(used)}; flags given here win")


def run_train(args: argparse.Namespace) -> int:
    require("torch")
    config = TrainConfig(**{name: getattr(args, name) for name in FIELDS if hasattr(args, name)})
    names, said = names_for_run(args.category_names, args.data_dir)
    if Path(args.data_dir, "train").is_dir():  # else the missing folder is what to fix first
        check_weights_reachable(config.arch)  # before torch loads: an offline vgg16 is refused in a second

    from .. import distributed
    from ..devices import select_device
    from ..training import check_finetune, run_training

    # run_training checks these too; here they come before the device note and torchrun's start-up.
    check_finetune(config)
    if distributed.is_main():
        if RECIPES[config.recipe]:
            print(f"Recipe {config.recipe}: {recipe_flags(config.recipe)}; flags given here win")
        _say_saved_defaults(args)
    device = select_device(args.gpu)
    if distributed.launched():  # started by torchrun: join the other processes
        device = distributed.init(device)
    main_process = distributed.is_main()
    pending = [said]  # said with the run's first line: a run refused before any work says only why

    def log(message: str) -> None:
        if main_process:
            print(*pending, message, sep="\n")
            pending.clear()

    resume = args.save_dir if args.resume == "__save_dir__" else args.resume
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: finished epochs are already saved. The caller's
    # handler comes back afterwards, for those who call main() in-process.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result = run_training(config, args.data_dir, save_dir=args.save_dir, device=device, cat_to_name=names,
                              resume=resume, cache_dir=args.cache_dir, negatives=args.negatives,
                              progress=not args.quiet and main_process,
                              log=log, test=args.test,
                              tensorboard=args.tensorboard)
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.cleanup()
    best = max(result.state.history, key=lambda h: h["valid_accuracy"]) if result.state.history else None
    if best and main_process:
        size_mb = result.best_path.stat().st_size / 1e6
        # "Saved" only for a best epoch this call trained, not one from before a resume.
        saved = "Saved" if best["epoch"] > result.state.epoch - result.epochs_run else "Kept in"
        print(f"Best epoch {best['epoch']}: valid accuracy {100 * best['valid_accuracy']:.1f}%. "
              f"{saved} {result.best_path} ({size_mb:.1f} MB); last epoch in {result.last_path}")
    return 0


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    add_shared(p, "data_dir")
    # Each trial is one head training: 10,000 is days of work already on VGG's features.
    p.add_argument("--trials", type=Number(int, 1, 10_000).parse, default=30,
                   help="head trainings to try (default: 30)")
    add_config_options(p, "arch", "augmented_views", "seed", "engine", seed="seeds the search and every trial",
                       augmented_views="augmented copies per training image, as in train.py")
    p.add_argument("--out", default=str(DEFAULTS_FILE),
                   help=f"where the best values go; train.py reads them as defaults (default: {DEFAULTS_FILE})")
    add_shared(p, "--cache_dir", "--workers", "--threads", "--gpu", "--quiet", "--overwrite",
               workers={"help": "data-loading worker processes for feature extraction (default: min(4, CPU count))"})


def run_search(args: argparse.Namespace) -> int:
    from ..backbones import build_backbone, frozen_part, get_spec
    from ..data import split_dir
    from ..devices import select_device
    from ..features import load_feature_data
    from ..files import check_output, head
    from ..frozen_pass import resolve_engine
    from ..search import SEARCHED, random_search, rows_per_split, save_best

    get_spec(args.arch)
    for split in ("train", "valid"):
        split_dir(args.data_dir, split)
    check_weights_reachable(args.arch)
    # Before any work: never an input, a checkpoint or a stranger's file (an earlier search's is replaced).
    out = check_output(args.out, option="--out", overwrite=args.overwrite,
                       ours=lambda p: head(p).startswith(b'{\n  "hyperparameters"'))
    device = select_device(args.gpu)
    backbone = build_backbone(args.arch)
    # The rows below the top n blocks, for the trials that fine-tune n (the features for n = 0).
    data = rows_per_split(lambda n: load_feature_data(
        args.data_dir, frozen_part(backbone, n), augmented_views=args.augmented_views, cache_dir=args.cache_dir,
        device=device, num_workers=args.workers, progress=not args.quiet, engine=resolve_engine(args.engine, device)))
    base = TrainConfig(arch=args.arch, seed=args.seed, augmented_views=args.augmented_views,
                       num_workers=args.workers, engine=data(0).stats.engine or resolve_engine(args.engine, device))
    results = random_search(data, base, trials=args.trials, seed=args.seed, backbone=backbone, device=device,
                            progress=not args.quiet)
    best = results[0]
    save_best(results, base, out, data_dir=args.data_dir)
    trial0 = next(r["valid_accuracy"] for r in results if r["trial"] == 0)
    print(f"Best of {len(results)} trials: valid accuracy {100 * best['valid_accuracy']:.1f}% (trial "
          f"{best['trial']}; trial 0 = the built-in defaults, {100 * trial0:.1f}%)")
    print("  " + as_flags({k: v for k, v in best["params"].items() if k in SEARCHED}))
    if out.resolve() == DEFAULTS_FILE.resolve():
        print(f"Saved to {out}: train.py run from this folder now uses these as its defaults (flags still win)")
    else:
        print(f"Saved to {out}: pass `--defaults {out}` to train.py to use them as its defaults")
    return 0


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint saved by train.py, rewritten (atomically) with its new calibration")
    add_shared(p, "data_dir")
    add_config_options(p, "unknown_score", "keep", "engine")
    add_shared(p, "--negatives", "--cache_dir", "--workers", "--gpu", "--quiet", negatives={
        "help": "a folder of photos that are none of the species: choose the unknown threshold with them too "
                "(default: from the species photos alone)"})


def run_calibrate(args: argparse.Namespace) -> int:
    from ..backbones import build_backbone, split_for_training
    from ..calibrating import calibrate_checkpoint, calibration_data, calibrated_line
    from ..datacheck import negative_photos
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..data import find_classes, split_dir
    from ..devices import select_device
    from ..files import check_rewrite
    from ..frozen_pass import resolve_engine

    target = check_rewrite(args.checkpoint)  # before any work: the folder must take the rewritten file
    ckpt = load_checkpoint(args.checkpoint)
    classes = find_classes(split_dir(args.data_dir, "train"))
    if classes != ckpt.classes:
        raise UserError(f"{args.data_dir}: its training categories ({len(classes)}) are not those of "
                        f"{args.checkpoint} ({len(ckpt.classes)}); pass the data folder it was trained on")
    split_dir(args.data_dir, "valid")
    if args.negatives is not None:
        negative_photos(args.negatives, data_dir=args.data_dir)
    # A fine-tuned checkpoint's features come from its own blocks on the frozen part's (cached) activations.
    device = select_device(args.gpu)
    frozen, top = split_for_training(build_backbone(ckpt.arch), ckpt.config.finetune)
    data = calibration_data(args.data_dir, classes, frozen, negatives=args.negatives,
                            cache_dir=args.cache_dir, device=device, num_workers=args.workers,
                            progress=not args.quiet, engine=resolve_engine(args.engine, device))
    ckpt.calibration, seen = calibrate_checkpoint(ckpt, classes, data, method=args.unknown_score, keep=args.keep,
                                                  top=top, device=device)
    save_checkpoint(ckpt, target)
    print(calibrated_line(ckpt.calibration, seen, classes, finetune=ckpt.config.finetune))
    print(f"Saved to {args.checkpoint}; an exported .onnx file keeps its old calibration: export it again")
    return 0
