"""Is fine-tuning the top blocks worth its cost? One run prints, over several seeds, the frozen default
beside `--finetune N` for a few N, each with and without test-time augmentation.

    python bench/bench_finetune.py ../shared/data/flower_photos_sample --arch efficientnet_lite0

Each row is `train.py DATA --arch ARCH --finetune N --seed S` as a user runs it (the project's
defaults for everything else; `--set name=value` overrides a default for every row), each run with
a cold cache of its own: its time is the whole cost of a first run (the cache pass, its ONNX export,
the epochs and the end-of-run calibration and test evaluation). Test top-1 is the kept (best by
validation) checkpoint on DATA/test, evaluated from the photos, then again with `--tta`. The cost
is also given as a ratio of one bare PyTorch eager forward pass of the whole backbone over
train + valid (the "floor" of bench_training.py), and of the frozen default's time, both measured
in this run. Cache size is what the run left on disk. The machine may be shared: runs are
interleaved by seed (every row once per seed), so a busy spell slows all rows alike.
"""
from __future__ import annotations

import argparse
import ast
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flower_classifier.backbones import build_backbone, get_spec  # noqa: E402
from flower_classifier.config import FIELDS, TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.evaluation import evaluate_checkpoint  # noqa: E402
from flower_classifier.frozen_pass import centre_view, extract_features  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def overrides(pairs: list[str]) -> dict:
    """`--set epochs=8 --set augmented_views=2` -> {"epochs": 8, "augmented_views": 2}."""
    values = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in FIELDS:
            raise SystemExit(f"--set {pair}: no option {name!r}")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[name] = text
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--finetune", type=int, nargs="+", default=[1, 2, 4], help="block counts beside 0 (frozen)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an option for every row, e.g. epochs=8 (default: the project's defaults)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    spec = get_spec(args.arch)
    counts = [0] + [n for n in args.finetune if 0 < n <= spec.num_blocks]
    base = TrainConfig(arch=args.arch, num_workers=args.workers, **overrides(args.set))
    train = FlowerFolder(split_dir(args.data_dir, "train"))
    valid = FlowerFolder(split_dir(args.data_dir, "valid"), classes=train.classes)
    paths = [s[0] for s in train.samples + valid.samples]
    backbone = build_backbone(args.arch)
    extract_features(backbone, paths[:8], centre_view(backbone), progress=False, engine="torch")  # warm-up
    start = time.perf_counter()
    extract_features(backbone, paths, centre_view(backbone), num_workers=args.workers, progress=False,
                     engine="torch")
    floor = time.perf_counter() - start
    changed = {k: v for k, v in base.to_dict().items() if v != TrainConfig(arch=args.arch).to_dict()[k]
               and k != "num_workers"}
    print(f"{args.arch}: {len(train)} train + {len(valid)} valid images; seeds {args.seeds}; "
          f"options beside the defaults: {changed or 'none'}")
    print(f"floor: one PyTorch eager forward pass over train + valid: {floor:.1f} s")

    results = {n: [] for n in counts}  # n: [(seconds, test top-1, tta top-1, cache bytes, checkpoint bytes)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            for n in counts:
                run = tmp / f"n{n}-s{seed}"
                config = base.replace(finetune=n, seed=seed)
                begin = time.perf_counter()
                result = run_training(config, args.data_dir, save_dir=run / "save", cache_dir=run / "cache",
                                      backbone=build_backbone(args.arch), progress=False, log=lambda m: None,
                                      test=True)
                seconds = time.perf_counter() - begin
                test_dir = split_dir(args.data_dir, "test")
                common = dict(num_workers=args.workers, progress=False)
                plain = evaluate_checkpoint(result.best_path, test_dir, **common)["accuracy"]
                tta = evaluate_checkpoint(result.best_path, test_dir, tta=True, **common)["accuracy"]
                results[n].append((seconds, plain, tta, folder_bytes(run / "cache"), result.best_path.stat().st_size))
                print(f"  seed {seed} finetune {n}: {seconds:.0f} s, test {100 * plain:.1f}% "
                      f"(tta {100 * tta:.1f}%)", flush=True)

    frozen_time = statistics.mean(r[0] for r in results[0])
    print("\n| --finetune | test top-1 mean (min-max) | with --tta | time (s) | x floor | x frozen | "
          "cache on disk | checkpoint |")
    print("|---|---|---|---|---|---|---|---|")
    for n, rows in results.items():
        seconds, plain, tta, cache, ckpt = zip(*rows)
        t = statistics.mean(seconds)

        def spread(values):
            return (f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.0f}-{100 * max(values):.0f})")
        print(f"| {n}{' (frozen)' if n == 0 else ''} | {spread(plain)} | {spread(tta)} | {t:.0f} | {t / floor:.1f}x "
              f"| {t / frozen_time:.1f}x | {max(cache) / 1e6:.1f} MB | {max(ckpt) / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
