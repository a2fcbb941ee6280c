"""What calibration costs in a warm rerun: the run on cached features split into start-up, epochs,
calibration and writing the run's files (as `bench_training.py --rerun_only` splits it), with the
valid-only rule (`calibrating.VALID_ONLY_PER_CLASS`) and with cross-fitting forced, rounds interleaved
in one process. The first run only fills the feature cache.

    python bench/bench_calibration_cost.py ../shared/data/flower_photos_2k [--epochs 10] [--rounds 2]

`--scores mahalanobis mahalanobis_species` compares unknown scores, interleaved in each round;
`--valid_only` skips the cross-fitted runs.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import StageClock  # noqa: E402

from flower_classifier import calibrating  # noqa: E402
from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.config import UNKNOWN_SCORES, TrainConfig  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scores", nargs="+", default=[TrainConfig.unknown_score], choices=UNKNOWN_SCORES,
                   help=f"unknown scores to compare (default {TrainConfig.unknown_score})")
    p.add_argument("--valid_only", action="store_true", help="only the valid-only rule's runs")
    args = p.parse_args(argv)
    backbone = build_backbone(args.arch)
    configs = {score: TrainConfig(arch=args.arch, epochs=args.epochs, num_workers=0, unknown_score=score)
               for score in args.scores}
    valid_only = calibrating.VALID_ONLY_PER_CLASS
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, per_class: int, score: str = args.scores[0]) -> None:
            calibrating.VALID_ONLY_PER_CLASS = per_class
            clock, lines = StageClock(), []
            config = configs[score]
            name = name if len(configs) == 1 else f"{score}, {name}"
            run_training(config, args.data_dir, save_dir=Path(tmp) / name, backbone=backbone, progress=False,
                         log=lambda m: (clock(m), lines.append(m)))
            split = clock.split(time.perf_counter())
            total = sum(split.values())
            print(f"{name}: {total:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
                  + f"; rerun / epochs {total / split['epochs']:.2f}x, calibration / epochs "
                  f"{split['calibration'] / split['epochs']:.2f}x; load {open('/proc/loadavg').read().split()[0]}",
                  flush=True)
            print("  " + next((m for m in lines if m.startswith("Calibrated on")), "(no calibration line)"), flush=True)

        run("fill the cache", valid_only)
        for r in range(1, args.rounds + 1):
            for score in configs:
                run(f"valid-only rule, round {r}", valid_only, score)
                if not args.valid_only:
                    run(f"cross-fitted rule, round {r}", 10**9, score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
