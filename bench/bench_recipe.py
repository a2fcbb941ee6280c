"""The fine-tuning recipe on a real data set: short train.py runs that differ in one knob at a time
(--finetune, --backbone_lr_factor, --schedule, --label_smoothing, --weight_decay), each scored on the
validation split (best epoch) and on the test split (`run_training(..., test=True)`), over seeds.

    python bench/bench_recipe.py ../shared/data/flower_photos_sample --arch efficientnet_lite0 --seeds 0 1

Every run shares one cache folder, so the frozen part runs once per split point. A 50-photo split
moves in 2% steps: read differences of a point or two as noise. The defaults in config.py were
chosen from this table (see the comments there).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402

# name -> the options that differ from the frozen default (TrainConfig's defaults)
VARIANTS = {
    "frozen": {},
    "frozen onecycle": {"schedule": "onecycle"},
    "frozen cosine": {"schedule": "cosine"},
    "frozen ls0.1": {"label_smoothing": 0.1},
    "frozen wd0.01": {"weight_decay": 0.01},
    "ft1 x0.1": {"finetune": 1, "backbone_lr_factor": 0.1},
    "ft2 x0.1": {"finetune": 2, "backbone_lr_factor": 0.1},
    "ft2 x0.1 onecycle": {"finetune": 2, "backbone_lr_factor": 0.1, "schedule": "onecycle"},
    "ft2 x0.1 cosine": {"finetune": 2, "backbone_lr_factor": 0.1, "schedule": "cosine"},
    "ft2 x0.01 onecycle": {"finetune": 2, "backbone_lr_factor": 0.01, "schedule": "onecycle"},
    "ft2 x1 onecycle": {"finetune": 2, "backbone_lr_factor": 1.0, "schedule": "onecycle"},
    "ft2 x0.1 onecycle ls0.1": {"finetune": 2, "backbone_lr_factor": 0.1, "schedule": "onecycle",
                                "label_smoothing": 0.1},
    "ft2 x0.1 onecycle wd0.01": {"finetune": 2, "backbone_lr_factor": 0.1, "schedule": "onecycle",
                                 "weight_decay": 0.01},
    "ft4 x0.1 onecycle": {"finetune": 4, "backbone_lr_factor": 0.1, "schedule": "onecycle"},
    # fine-tuning on top of --recipe best (label smoothing 0.1), for the 2,269-photo folder
    "ft2 x0.1 ls0.1": {"finetune": 2, "backbone_lr_factor": 0.1, "label_smoothing": 0.1},
    "ft2 x0.3 ls0.1": {"finetune": 2, "backbone_lr_factor": 0.3, "label_smoothing": 0.1},
    "ft2 x0.1 ls0.1 10ep": {"finetune": 2, "backbone_lr_factor": 0.1, "label_smoothing": 0.1, "epochs": 10},
    "ft2 x0.1 ls0.1 views2": {"finetune": 2, "backbone_lr_factor": 0.1, "label_smoothing": 0.1,
                              "augmented_views": 2},
    "ft4 x0.1 ls0.1": {"finetune": 4, "backbone_lr_factor": 0.1, "label_smoothing": 0.1},
    "ft4 x0.3 ls0.1": {"finetune": 4, "backbone_lr_factor": 0.3, "label_smoothing": 0.1},
    "ft4 x0.1 ls0.1 views2": {"finetune": 4, "backbone_lr_factor": 0.1, "label_smoothing": 0.1,
                              "augmented_views": 2},
    "ft4 x0.1 ls0.1 10ep": {"finetune": 4, "backbone_lr_factor": 0.1, "label_smoothing": 0.1, "epochs": 10},
    "ft6 x0.1 ls0.1": {"finetune": 6, "backbone_lr_factor": 0.1, "label_smoothing": 0.1},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS (default: all)")
    p.add_argument("--cache_dir", default=None, help="feature cache shared by the runs (default: a temporary one)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="options given to every variant, e.g. augmented_views=2 (parsed as Python literals)")
    p.add_argument("--runs_dir", default=None, help="keep each run's folder here (default: a temporary one)")
    args = p.parse_args()
    import ast

    common = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or str(Path(tmp) / "cache")
        runs = Path(args.runs_dir or tmp)
        print(f"{'variant':<28} {'valid (best epoch)':>20} {'test top-1':>22} {'s/run':>7}")
        for name in args.variants:
            valid, test, seconds = [], [], []
            for seed in args.seeds:
                # a variant's own epochs (or other option) wins over --epochs and --set
                config = TrainConfig(**{"arch": args.arch, "epochs": args.epochs, "seed": seed, **common,
                                        **VARIANTS[name]})
                start = time.perf_counter()
                result = run_training(config, args.data_dir, save_dir=runs / f"{name}-{seed}".replace(" ", "_"),
                                      cache_dir=cache, test=True, progress=False, log=lambda message: None)
                seconds.append(time.perf_counter() - start)
                valid.append(max(h["valid_accuracy"] for h in result.state.history))
                test.append(result.evaluated.accuracy)
                print(f"  {name} seed {seed}: valid {100 * valid[-1]:.1f}% test {100 * test[-1]:.1f}% "
                      f"{seconds[-1]:.0f} s", flush=True)
            show = lambda xs: f"{100 * statistics.mean(xs):5.1f}% ({' '.join(f'{100 * x:.0f}' for x in xs)})"  # noqa: E731
            print(f"{name:<28} {show(valid):>20} {show(test):>22} {statistics.mean(seconds):7.1f}", flush=True)


if __name__ == "__main__":
    main()
