"""How far a frozen backbone can go on a small real data set: the README's real check over several
seeds, beside the best a linear classifier on the same frozen features reaches under cross-validation.

    python bench/bench_real_check.py ../shared/data/flower_photos_sample --arch efficientnet_lite0

Part 1 runs `train.py DATA --arch ARCH --epochs E --seed S` (the default cached path) for each seed
and evaluates the kept checkpoint on the test split, as `python -m flower_classifier evaluate` does.
Part 2 asks whether any head could do much better: it fits an L2-regularised multinomial logistic
regression (L-BFGS, to convergence) on the frozen centre-crop features for each L2 strength, scored
by repeated k-fold cross-validation over train + valid; the strength with the best CV mean is then
refitted on train + valid and scored once on test (one figure, which names its strength: the test
split is never used to choose anything). A 50-photo test split moves in 2%
steps; the cross-validated figure, over 5x as many held-out predictions, is the steadier estimate.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.evaluation import evaluate_checkpoint  # noqa: E402
from flower_classifier.frozen_pass import centre_view, extract_features  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising cross-entropy + l2 * |W|^2: a convex problem, so
    L-BFGS finds its optimum and no learning rate or epoch count is left to tune."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        value.backward()
        return value

    opt.step(loss)
    return w.detach(), b.detach()


def cross_validated(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, folds: int,
                    repeats: int) -> list[float]:
    """Accuracy of each held-out fold, over `repeats` random k-fold splits."""
    scores = []
    for r in range(repeats):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(r))
        for part in order.tensor_split(folds):
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[part] = False
            w, b = fit_linear(x[keep], y[keep], classes, l2)
            scores.append(((x[part] @ w + b).argmax(1) == y[part]).float().mean().item())
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=5, help="part 1: seeds 0..N-1")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="part 2: random k-fold splits")
    p.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    backbone = build_backbone(args.arch)
    test_dir = split_dir(args.data_dir, "test")
    print(f"{args.arch}; {args.data_dir}; part 1: train.py --epochs {args.epochs}, seeds 0-{args.seeds - 1}")
    print(f"\n{'seed':>4} {'best valid':>10} {'test top-1':>10} {'test top-5':>10}")
    tests = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            config = TrainConfig(arch=args.arch, epochs=args.epochs, seed=seed, num_workers=args.workers)
            result = run_training(config, args.data_dir, save_dir=Path(tmp) / str(seed), backbone=backbone,
                                  cache_dir=Path(tmp) / "cache", progress=False, log=lambda m: None)
            valid = max(h["valid_accuracy"] for h in result.state.history)
            test = evaluate_checkpoint(result.best_path, test_dir, num_workers=args.workers, progress=False)
            tests.append(test["accuracy"])
            print(f"{seed:>4} {100 * valid:>9.0f}% {100 * test['accuracy']:>9.0f}% {100 * test['top5']:>9.0f}%",
                  flush=True)
    print(f"test top-1 over {len(tests)} seeds: mean {100 * statistics.mean(tests):.1f}%, "
          f"min {100 * min(tests):.0f}%, max {100 * max(tests):.0f}%, "
          f"{sum(t >= 0.9 for t in tests)} of {len(tests)} at 90% or more")

    train = FlowerFolder(split_dir(args.data_dir, "train"))
    splits = {"train": train, "valid": FlowerFolder(split_dir(args.data_dir, "valid"), classes=train.classes),
              "test": FlowerFolder(test_dir, classes=train.classes)}
    features, labels = {}, {}
    for name, folder in splits.items():
        x, ok = extract_features(backbone, [s[0] for s in folder.samples], centre_view(backbone),
                                 num_workers=args.workers, progress=False)
        features[name], labels[name] = x[ok], torch.tensor([s[1] for s in folder.samples])[ok]
    x = torch.cat([features["train"], features["valid"]])
    y = torch.cat([labels["train"], labels["valid"]])
    k = len(train.classes)
    print(f"\npart 2: linear classifier on frozen features; {args.repeats}x {args.folds}-fold CV over "
          f"train + valid ({len(y)} photos); the test split ({len(labels['test'])} photos) chooses nothing")
    print(f"{'L2':>8} {'CV mean':>8} {'+/- s.e.':>9}")
    cv = {}
    for l2 in args.l2:
        scores = cross_validated(x, y, k, l2, args.folds, args.repeats)
        cv[l2] = statistics.mean(scores)
        se = statistics.stdev(scores) / len(scores) ** 0.5
        print(f"{l2:>8g} {100 * cv[l2]:>7.1f}% {100 * se:>8.1f}%", flush=True)
    chosen = max(args.l2, key=lambda l2: cv[l2])  # by cross-validation alone; a tie goes to the first listed
    w, b = fit_linear(x, y, k, chosen)
    test = ((features["test"] @ w + b).argmax(1) == labels["test"]).float().mean().item()
    print(f"test top-1 {100 * test:.0f}% ({len(labels['test'])} photos): L2 = {chosen:g}, the strength with the "
          f"best CV mean above (chosen by cross-validation on train + valid, never on the test split), "
          f"refitted on train + valid and scored once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
