"""Cheap ideas on top of trained runs: mirror TTA, and averaging two runs' probabilities (a
fine-tuned run with a frozen one, say), each scored on the valid and test splits.

    python bench/bench_ensemble.py DATA --pair RUN_A RUN_B [--pair RUN_C RUN_D ...]

RUN is a run folder (or its checkpoint.pth, the best epoch) of `train.py` / bench_recipe.py
--runs_dir. Each checkpoint runs once per split with and without mirror TTA (`evaluate --tta`);
the pair's softmax outputs are averaged. Printed per pair: top-1 of A, B and A+B, plain and TTA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from flower_classifier.data import split_dir  # noqa: E402
from flower_classifier.evaluation import split_dataset, model_outputs  # noqa: E402
from flower_classifier.predictor import load_predictor  # noqa: E402


def probabilities(checkpoint: Path, split: Path, tta: bool, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs (N, C) and targets (N,) of a checkpoint over one split."""
    predictor = load_predictor(checkpoint, onnx=False)
    out = model_outputs(predictor.model, split_dataset(split, predictor), num_workers=workers, tta=tta)
    z = out.logits - out.logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True), out.targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("RUN_A", "RUN_B"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    def checkpoint(run: str) -> Path:
        path = Path(run)
        return path / "checkpoint.pth" if path.is_dir() else path

    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # a run shared by pairs is evaluated once

    def outputs(run: str, split: str, tta: bool):
        key = (run, split, tta)
        if key not in cache:
            cache[key] = probabilities(checkpoint(run), split_dir(args.data_dir, split), tta, args.workers)
        return cache[key]

    print("| A | B | split | A | B | A+B | A, TTA | B, TTA | A+B, TTA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b in args.pair:
        for split in ("valid", "test"):
            cells = []
            for tta in (False, True):
                (pa, ta), (pb, tb) = outputs(a, split, tta), outputs(b, split, tta)
                assert (ta == tb).all(), "the two runs list the split's photos differently"
                cells += [((pa.argmax(1) == ta).mean()), ((pb.argmax(1) == ta).mean()),
                          (((pa + pb).argmax(1) == ta).mean())]
            print(f"| {Path(a).name} | {Path(b).name} | {split} | "
                  + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
