"""How fast training is against the floors: one run prints the forward-pass floors, the classic loop and
the cached path.

    python bench/bench_training.py DATA_DIR --arch efficientnet_lite0 --epochs 10 [--views 4] [--repeat 2]

- floors: one bare forward pass of the backbone over the train + valid images (no training at all),
  by PyTorch eager (`--engine torch`) and by ONNX Runtime (`--engine onnx`, exported beforehand);
- classic: `train.py --classic --no_augment` (backbone on the same centre crops every epoch), then
  `train.py --classic` (backbone on freshly augmented images every epoch);
- cached: `train.py` as it runs by default (features computed once, cold cache: the ONNX export
  included; centre crops only, so no augmentation, as with --no_augment), the same with `--engine
  torch`, then again with a warm cache (a second run or a search), then with `--views` augmented
  copies per training image.
Like is compared with like: the classic loop without augmentation sees the cached path's inputs in
the same order (its accuracy should match), and the augmented classic loop stands beside the cached
path with augmented views. Every run trains the same head for the same epochs with the same seed.
The machine may be shared: the runs are interleaved, `--repeat` rounds of all of them, and each
keeps its fastest (other jobs only ever add time), so the ratios compare runs made side by side.
Accuracy is the best epoch's on the valid split. The cached checkpoint is also re-evaluated end to
end from the images, which checks that the float16 features cost nothing.

The warm run is also split into its stages, from the times its log lines appear: start-up (until
"Training ..."), the epochs (until the last epoch's line), calibration (until "Calibrated on"), and
writing the run's files (the record: until run_training returns). `--rerun_only` times just the
PyTorch eager floor, the cold run and the warm rerun (the rerun loop's figures).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.evaluation import evaluate_checkpoint  # noqa: E402
from flower_classifier import features  # noqa: E402
from flower_classifier.devices import cpu_cores, select_device  # noqa: E402
from flower_classifier.features import centre_view, extract_features, share_cores  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402


FLOOR = {"torch": "floor: one PyTorch eager pass (train+valid)", "onnx": "floor: one ONNX Runtime pass (train+valid)"}
CLASSIC = "classic loop, no augmentation (the cached inputs)"
CLASSIC_AUG = "classic loop, augmented every epoch"
COLD = "default: cached, first run (cold cache, export included)"
COLD_TORCH = "cached, first run, --engine torch (cold cache)"
WARM = "cached, second run (warm cache)"
STAGES = (("start-up", "Training "), ("epochs", "Epoch "), ("calibration", "Calibrated on"), ("writing the run's files", None))


class StageClock:
    """A log that notes when the lines of each stage's end appear (the last line starting with its
    prefix): the warm rerun's time split into STAGES."""

    def __init__(self):
        self.start, self.seen = time.perf_counter(), {}

    def __call__(self, message: str) -> None:
        for name, prefix in STAGES:
            if prefix and message.startswith(prefix):
                self.seen[name] = time.perf_counter()

    def split(self, end: float) -> dict[str, float]:
        marks, last, out = {**self.seen, STAGES[-1][0]: end}, self.start, {}
        for name, _ in STAGES:
            if name in marks:
                out[name], last = marks[name] - last, marks[name]
        return out


def timed(fn):
    """(result, wall seconds, CPU seconds of this process: all its threads, not the image-decoding
    workers; what contention disturbs least)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def cpu_seconds() -> float:
    """CPU seconds so far of this process and of its finished children (the decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_splits(backbone, paths, repeat: int, workers: int) -> int:
    """The ONNX Runtime feature pass over `paths` with each (decode workers, engine threads) on this
    machine's cores, in interleaved rounds, the fastest of each: what `features.share_cores` chooses
    from. Also the CPU seconds of the pass, decode workers included, which contention disturbs less,
    and the load average before and after (other jobs on a shared machine)."""
    cores = cpu_cores()
    splits = [(w, t) for w in sorted({0, 1, 2, max(1, cores // 4), cores}) for t in sorted({1, 2, cores})]
    chosen = features.share_cores(workers, torch.device("cpu"))
    best, cpu = {}, {}
    real = features.share_cores
    load_before = os.getloadavg()
    try:
        extract_features(backbone, paths[:8], centre_view(backbone), progress=False, engine="onnx")  # the export
        for round_ in range(repeat):
            for split in splits:
                features.share_cores = lambda n, device, split=split: split
                start = cpu_seconds()
                _, wall, _ = timed(lambda: extract_features(backbone, paths, centre_view(backbone), progress=False,
                                                            num_workers=split[0], engine="onnx"))
                if wall < best.get(split, float("inf")):
                    best[split], cpu[split] = wall, cpu_seconds() - start
            print(f"round {round_ + 1}/{repeat} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        features.share_cores = real
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (1 min)"
    print(f"\n{len(paths)} images, ONNX Runtime, {cores} cores, fastest of {repeat} interleaved rounds; {load}")
    print(f"{'decode workers':>14} {'engine threads':>14} {'seconds':>8} {'images/s':>9} {'CPU s':>6}")
    for (w, t), wall in sorted(best.items(), key=lambda item: item[1]):
        print(f"{w:>14} {t:>14} {wall:>8.1f} {len(paths) / wall:>9.1f} {cpu[(w, t)]:>6.1f}"
              f"{'  <- default (features.share_cores)' if (w, t) == chosen else ''}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--views", type=int, default=4, help="augmented views for the last run (0: skip it)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--hidden_units", type=int, nargs="+", default=[512])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--skip_classic", action="store_true", help="for very slow backbones")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every run, interleaved; the fastest of each kept")
    p.add_argument("--splits", action="store_true", help="only time the ONNX feature pass with each split of the "
                   "cores between decode workers and engine threads")
    p.add_argument("--rerun_only", action="store_true", help="only the PyTorch eager floor, the cold run and the "
                   "warm rerun (split into its stages)")
    args = p.parse_args(argv)
    views_row = f"cached + {args.views} augmented views (centre crops cached)"

    device = select_device(args.gpu)
    backbone = build_backbone(args.arch)
    train = FlowerFolder(split_dir(args.data_dir, "train"))
    valid = FlowerFolder(split_dir(args.data_dir, "valid"), classes=train.classes)
    paths = [s[0] for s in train.samples + valid.samples]
    n = len(paths)
    on_cpu = device.type == "cpu"
    decoders, engine_threads = share_cores(args.workers, device)
    print(f"{args.arch} on {device} ({cpu_cores()} cores; feature pass: {decoders} decode workers + "
          f"{engine_threads or torch.get_num_threads()} engine threads); {len(train)} train + {len(valid)} valid "
          f"images; {args.epochs} epochs, head {args.hidden_units}, {args.repeat} interleaved rounds")

    if args.splits:
        return time_splits(backbone, paths, args.repeat, args.workers)
    engines = ["torch", "onnx"] if on_cpu and not args.rerun_only else ["torch"]
    if args.rerun_only:
        args.skip_classic, args.views = True, 0
    for engine in engines:  # warm-up, and the ONNX floor's export made beforehand
        extract_features(backbone, paths[:8], centre_view(backbone), device=device, progress=False, engine=engine)
    base = TrainConfig(arch=args.arch, epochs=args.epochs, hidden_units=tuple(args.hidden_units),
                       num_workers=args.workers)
    quiet = dict(device=device, backbone=backbone, progress=False, log=lambda m: None)
    runs = {}  # name: (what to time, images it runs the backbone on)
    for engine in engines:
        runs[FLOOR[engine]] = (lambda engine=engine: extract_features(
            backbone, paths, centre_view(backbone), device=device, num_workers=args.workers, progress=False,
            engine=engine), n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        caches = iter(range(10**6))

        stages = []  # the warm runs' stage times, one dict per round

        def train_run(name, config, fresh_cache=False, clock=False):
            def once():
                if fresh_cache:  # cold: nothing cached on disk, nothing exported in this process
                    features._onnx_sessions.clear()
                cache = tmp / (f"cache{next(caches)}" if fresh_cache else "cache0")
                log = StageClock() if clock else quiet["log"]
                result = run_training(config, args.data_dir, save_dir=tmp / f"{name}{next(caches)}", cache_dir=cache,
                                      **{**quiet, "log": log})
                if clock:
                    stages.append(log.split(time.perf_counter()))
                return result
            return once

        if not args.skip_classic:
            runs[CLASSIC] = (train_run("classic", base.replace(feature_cache=False, augment=False)), n * args.epochs)
            runs[CLASSIC_AUG] = (train_run("classic_aug", base.replace(feature_cache=False)), n * args.epochs)
        runs[COLD] = (train_run("cold", base, fresh_cache=True), n)
        if on_cpu and not args.rerun_only:
            runs[COLD_TORCH] = (train_run("cold_torch", base.replace(engine="torch"), fresh_cache=True), n)
        train_run("warm", base)()  # fills cache0
        runs[WARM] = (train_run("warm", base, clock=True), None)
        if args.views:
            runs[views_row] = (train_run("views", base.replace(augmented_views=args.views)), len(train) * args.views)

        best = {}  # name: (result, wall, cpu), the fastest round
        for round_ in range(args.repeat):
            for name, (fn, _) in runs.items():
                if name == views_row:  # its augmented views must be computed again each round
                    for view_dir in (tmp / "cache0").glob("*/aug*"):
                        shutil.rmtree(view_dir)
                got = timed(fn)
                if name not in best or got[1] < best[name][1]:
                    best[name] = got
            print(f"round {round_ + 1}/{args.repeat} done; fastest so far (s, in the table's order): "
                  + " ".join(f"{b[1]:.1f}" for b in best.values()), flush=True)
        end_to_end = evaluate_checkpoint(best[COLD][0].best_path, split_dir(args.data_dir, "valid"), device=device,
                                         num_workers=args.workers, progress=False)["accuracy"]

    floor, floor_cpu = best[FLOOR["torch"]][1:]
    wall = {name: b[1] for name, b in best.items()}
    cpu = {name: b[2] for name, b in best.items()}
    accuracy = {name: max(h["valid_accuracy"] for h in b[0].state.history)
                for name, b in best.items() if hasattr(b[0], "state")}
    print(f"\n{'run':<58} {'seconds':>8} {'x torch floor':>13} {'x onnx floor':>12} {'CPU s':>7} {'valid acc':>10} "
          f"{'images/s':>9}")
    for name, (_, images) in runs.items():
        onnx_ratio = f"{wall[name] / wall[FLOOR['onnx']]:.2f}" if FLOOR["onnx"] in wall else ""
        acc = f"{100 * accuracy[name]:.1f}%" if name in accuracy else ""
        print(f"{name:<58} {wall[name]:>8.1f} {wall[name] / floor:>13.2f} {onnx_ratio:>12} {cpu[name]:>7.1f} "
              f"{acc:>10} {'' if not images else f'{images / wall[name]:.1f}':>9}")
    print()
    if not args.skip_classic:
        print(f"no augmentation, same inputs in the same order: classic loop {100 * accuracy[CLASSIC]:.1f}% vs "
              f"cached {100 * accuracy[COLD]:.1f}% valid accuracy; cached is "
              f"{wall[CLASSIC] / wall[COLD]:.1f}x faster ({cpu[CLASSIC] / cpu[COLD]:.1f}x in CPU time)")
        if args.views:
            print(f"augmented: classic loop (fresh every epoch) {100 * accuracy[CLASSIC_AUG]:.1f}% vs cached + "
                  f"{args.views} augmented views {100 * accuracy[views_row]:.1f}% valid accuracy")
    print(f"cached (cold) / PyTorch eager floor: {wall[COLD] / floor:.2f}x ({cpu[COLD] / floor_cpu:.2f}x in CPU time)"
          + (f"; / ONNX Runtime floor: {wall[COLD] / wall[FLOOR['onnx']]:.2f}x" if FLOOR["onnx"] in wall else ""))
    if COLD_TORCH in accuracy:
        print(f"engines: default (onnx) {100 * accuracy[COLD]:.1f}% vs --engine torch {100 * accuracy[COLD_TORCH]:.1f}% "
              f"valid accuracy")
    print(f"cached checkpoint re-evaluated from the images (float32 features): valid acc {100 * end_to_end:.1f}%")
    fastest = min(stages, key=lambda s: sum(s.values()))
    epochs = fastest.get("epochs", float("nan"))
    print(f"\nwarm rerun ({sum(fastest.values()):.1f} s, fastest round) by stage; load average "
          f"{os.getloadavg()[0]:.1f} (1 min):")
    for name, seconds in fastest.items():
        print(f"  {name:<24} {seconds:>7.1f} s  {seconds / epochs:>6.2f}x the epochs")
    print(f"  warm rerun / its epochs: {sum(fastest.values()) / epochs:.2f}x (goal: at most 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
