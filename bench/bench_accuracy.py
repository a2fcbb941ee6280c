"""What moves held-out accuracy, measured on cached frozen features: a logistic-regression probe
beside the head train.py trains, and one knob at a time (head width, dropout, label smoothing,
epochs, augmented views, mirror TTA, seed ensembles), for each backbone asked for.

    python bench/bench_accuracy.py ../shared/data/flower_photos_2k --arch efficientnet_lite0
    python bench/bench_accuracy.py ../shared/data/flower_photos_2k --arch efficientnet_lite2 --views 0
    python bench/bench_accuracy.py ../shared/data/flower_photos_2k --arch efficientnet_lite0 efficientnet_lite2 --cost 48

Each backbone's features are computed once through the project's feature cache (centre crop of
train/valid/test, the mirror images of valid/test for TTA, and `--views` augmented views of train) and every
row trains on them, so the table costs seconds once the cache is warm. Head rows replay train.py's
cached path (the same head, AdamW, batches of 32, the epoch kept by validation accuracy) over
`--seeds`: mean (min-max). The probe is L2 logistic regression on the centre-crop features, its
strength chosen on valid/. Choose on the valid columns only; test/ is for reporting the choice.
Rows that need augmented views are left out when `--views` computes fewer. `--cost N` instead
times a cold feature pass per backbone, the part of a first run that the backbone decides.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.data import FlowerFolder, eval_transform, split_dir  # noqa: E402
from flower_classifier.features import FeatureStore, View, augmented_view, cached_rows, centre_view  # noqa: E402
from flower_classifier.model import build_head  # noqa: E402

SPLITS = ("train", "valid", "test")


def mirror_view(backbone) -> View:
    """The centre crop of the mirrored photo: what `predict --tta` adds to each photo."""
    p = backbone.preprocessing
    return View("mirror", T.Compose([T.RandomHorizontalFlip(p=1.0), eval_transform(p)]), min_size=p.resize_size)


def load(data_dir: str, arch: str, views: int, cache_dir: str | None) -> dict:
    """{split: (centre (N, D), mirror (N, D) or None for train, labels (N,))} and "aug": [(N_train, D)] * views,
    float32."""
    backbone = build_backbone(arch)
    store = FeatureStore(cache_dir, backbone)
    train = FlowerFolder(split_dir(data_dir, "train"))
    out, start = {}, time.perf_counter()
    for split in SPLITS:
        folder = train if split == "train" else FlowerFolder(split_dir(data_dir, split), classes=train.classes)
        paths, labels = [p for p, _ in folder.samples], np.array([y for _, y in folder.samples])

        def rows(view):
            got, ok = cached_rows(backbone, paths, view, store, engine="auto", progress=False)
            assert bool(ok.all()), f"unreadable photos in {split}"
            return got.tensor().float().numpy()
        # Mirror images only where TTA predicts: valid and test.
        out[split] = (rows(centre_view(backbone)), None if split == "train" else rows(mirror_view(backbone)), labels)
        if split == "train":
            out["aug"] = [rows(augmented_view(backbone, i)) for i in range(1, views + 1)]
    print(f"{arch}: features of {sum(len(out[s][2]) for s in SPLITS)} photos ({views} augmented views of train) "
          f"ready in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def pass_cost(data_dir: str, archs: list[str], photos: int, rounds: int = 2) -> None:
    """Seconds per photo of a cold feature pass (no cache, the engine train.py uses) for each backbone,
    interleaved over `rounds` so that a busy spell slows all alike; the ratio is to the first."""
    paths = [p for p, _ in FlowerFolder(split_dir(data_dir, "train")).samples][:photos]
    backbones = {arch: build_backbone(arch) for arch in archs}
    for backbone in backbones.values():  # warm-up: the ONNX export and the first session
        cached_rows(backbone, paths[:4], centre_view(backbone), None, engine="auto", progress=False)
    seconds = {arch: 0.0 for arch in archs}
    for _ in range(rounds):
        for arch, backbone in backbones.items():
            start = time.perf_counter()
            cached_rows(backbone, paths, centre_view(backbone), None, engine="auto", progress=False)
            seconds[arch] += time.perf_counter() - start
    first = seconds[archs[0]]
    print("cold feature pass: " + "; ".join(f"{arch} {1000 * t / (rounds * len(paths)):.0f} ms/photo "
                                            f"({t / first:.2f}x)" for arch, t in seconds.items()), flush=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def probe(f: dict, tta: bool, lams=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)) -> tuple[float, float, float]:
    """L2 logistic regression on the standardised centre-crop features, solved to convergence by
    L-BFGS; its strength chosen on valid. (C, valid, test)."""
    x, _, y = f["train"]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = lambda a: torch.from_numpy((a - mu) / sd)  # noqa: E731
    xt, yt = z(x), torch.from_numpy(y)
    best = None
    for lam in lams:
        torch.manual_seed(0)
        lin = nn.Linear(x.shape[1], int(y.max()) + 1)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(lin(xt), yt) + lam / 2 * lin.weight.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            out = {s: _tta(lambda a: lin(z(a)).numpy(), f[s], tta) for s in ("valid", "test")}
        score = accuracy(out["valid"], f["valid"][2])
        if best is None or score > best[1]:
            best = (lam, score, accuracy(out["test"], f["test"][2]))
    return best


def _tta(run, split, tta: bool) -> np.ndarray:
    """Logits of a split's photos, averaged with their mirror images' when `tta` (as predict --tta)."""
    centre, mirror, _ = split
    return (run(centre) + run(mirror)) / 2 if tta else run(centre)


def head(f: dict, seed: int, *, hidden=(512,), dropout=0.2, label_smoothing=0.0, epochs=5, views=0,
         learning_rate=1e-3, weight_decay=0.0, batch_size=32) -> tuple[nn.Module, int]:
    """train.py's cached path on these features: the head, trained as `training.fit` trains it, at
    the epoch with the best validation accuracy (the first such), and that epoch."""
    torch.manual_seed(seed)
    x = np.concatenate([f["train"][0], *f["aug"][:views]])
    y = np.concatenate([f["train"][2]] * (1 + views))
    model = build_head(x.shape[1], hidden, int(y.max()) + 1, dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xv, yv = torch.from_numpy(f["valid"][0]), f["valid"][2]
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = -1.0, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(xt), generator=g).split(batch_size):
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            score = accuracy(model(xv).numpy(), yv)
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), best_epoch


def logits_of(model: nn.Module, f: dict, split: str, tta: bool) -> np.ndarray:
    with torch.no_grad():
        return _tta(lambda a: model(torch.from_numpy(a)).numpy(), f[split], tta)


# name -> options of `head` that differ from train.py's defaults (every row is also scored with mirror TTA).
VARIANTS = {
    "default": {},
    "linear head (no hidden layer)": {"hidden": ()},
    "hidden 1024": {"hidden": (1024,)},
    "hidden 256": {"hidden": (256,)},
    "dropout 0.5": {"dropout": 0.5},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "epochs 15": {"epochs": 15},
    "weight decay 0.05": {"weight_decay": 0.05},
    "views 2": {"views": 2},
    "views 4": {"views": 4},
    "views 4, epochs 10": {"views": 4, "epochs": 10},
    "views 4, epochs 10, ls 0.1": {"views": 4, "epochs": 10, "label_smoothing": 0.1},
    "views 2, epochs 10, ls 0.1": {"views": 2, "epochs": 10, "label_smoothing": 0.1},
}
# The rows of the tables in docs/benchmarks.md.
MEASURED = ["default", "label smoothing 0.1", "hidden 1024", "epochs 15", "views 2", "views 2, epochs 10, ls 0.1"]


def show(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}%"
    return f"{100 * statistics.mean(xs):.1f}% ({100 * min(xs):.1f}-{100 * max(xs):.1f})"


def table(arch: str, f: dict, variants: list[str], seeds: list[int], probes: bool = True) -> None:
    """One row per variant: valid and test top-1 of its heads, plain and with mirror TTA (the same
    heads), mean (min-max) over seeds, then the ensemble of the seeds' heads (softmax averaged)."""
    print(f"\n{arch}: train {len(f['train'][2])} / valid {len(f['valid'][2])} / test {len(f['test'][2])} photos; "
          f"seeds {seeds}")
    print(f"| {arch} | valid | test | valid, tta | test, tta | ensemble valid, tta | ensemble test, tta | s per seed |")
    print("| --- | --- | --- | --- | --- | --- | --- | ---: |")
    if probes:
        start = time.perf_counter()
        lam, valid, test = probe(f, False)
        _, valid_tta, test_tta = probe(f, True, lams=(lam,))
        print(f"| logistic-regression probe (L2 {lam:g}, chosen on valid) | {show([valid])} | {show([test])} "
              f"| {show([valid_tta])} | {show([test_tta])} | | | {time.perf_counter() - start:.1f} |", flush=True)
    for name in variants:
        if VARIANTS[name].get("views", 0) > len(f["aug"]):
            continue
        scores = {(split, tta): [] for tta in (False, True) for split in ("valid", "test")}  # the header's order
        ensemble, start = {"valid": 0, "test": 0}, time.perf_counter()
        for seed in seeds:
            model, _ = head(f, seed, **VARIANTS[name])
            for (split, tta), got in scores.items():
                out = logits_of(model, f, split, tta)
                got.append(accuracy(out, f[split][2]))
                if tta:
                    ensemble[split] = ensemble[split] + torch.softmax(torch.from_numpy(out), 1).numpy()
        seconds = (time.perf_counter() - start) / len(seeds)
        together = [show([accuracy(ensemble[s], f[s][2])]) if len(seeds) > 1 else "" for s in ("valid", "test")]
        print(f"| {name} | {' | '.join(show(v) for v in scores.values())} | {' | '.join(together)} "
              f"| {seconds:.1f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--arch", nargs="+", default=["efficientnet_lite0"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--views", type=int, default=2, help="augmented views of train to compute (default: 2)")
    p.add_argument("--variants", nargs="+", default=MEASURED, choices=list(VARIANTS), metavar="NAME",
                   help=f"rows of VARIANTS to run (default: {', '.join(MEASURED)})")
    p.add_argument("--cost", type=int, default=0, metavar="N",
                   help="only time a cold feature pass over N training photos per backbone (default: off)")
    p.add_argument("--no_probe", action="store_true", help="leave out the probe rows")
    p.add_argument("--cache_dir", default=None, help="feature cache (default: the project's)")
    args = p.parse_args(argv)
    if args.cost:
        pass_cost(args.data_dir, args.arch, args.cost)
        return 0
    torch.set_num_threads(1)
    for arch in args.arch:
        f = load(args.data_dir, arch, args.views, args.cache_dir)
        table(arch, f, args.variants, args.seeds, not args.no_probe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
