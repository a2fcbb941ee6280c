"""How fast the frozen pass is against a bare ONNX Runtime session on the same photos, small and full-size.

    python bench/bench_frozen_pass.py DATA [--full DIR] [--images 320] [--rounds 2] [--check_draft]

DATA (e.g. ../shared/data/flower_photos_2k, 224 px photos) and, with `--full DIR`, the same
photos as full-size JPEGs (made there first if DIR is empty: each photo upscaled to 800x600 and
re-encoded, as large as Oxford 102's 500-1,000 px photos; put DIR under /tmp). For each set, in
`--rounds` interleaved rounds (each keeps its fastest: other jobs only add time), over the first
`--images` photos of train/:

- floor: the PyTorch eager pass (`extract_features(engine="torch")`, decoding included);
- ours: the ONNX Runtime pass as training runs it (`extract_features(engine="onnx")`, --workers 2);
- before: the same pass with the split this project used before (1 decode worker process, 1 engine
  thread), for the ratio;
- bare ORT: what a user would write: decode (`images.decode_image`, reduced-size JPEG decoding as
  prediction does), `images.preprocess`, then one `InferenceSession.run` per 32 photos with ONNX
  Runtime's default options, all serial;
- inference only: that session on photos decoded beforehand (the engine's own ceiling).

`--check_draft`: on the full-size photos (`--draft_train` of train/, all of test/), whether decoding large JPEGs at reduced size (the centre
crop's `min_size`, as prediction does) changes accuracy: a linear head fitted on the train split's
features, the test split's accuracy with and without reduced-size decoding (features of both).
Prints the load average before and after: on a shared machine the figures hold for that load.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flower_classifier import frozen_pass  # noqa: E402
from flower_classifier.backbones import build_backbone  # noqa: E402
from flower_classifier.config import TrainConfig  # noqa: E402
from flower_classifier.data import FlowerFolder, split_dir  # noqa: E402
from flower_classifier.devices import cpu_cores  # noqa: E402
from flower_classifier.frozen_pass import View, centre_view, extract_features  # noqa: E402
from flower_classifier.images import decode_image, list_photos, preprocess  # noqa: E402

FULL_SIZE = (800, 600)


def make_full_size(data: Path, out: Path) -> None:
    """Every photo of `data` upscaled to FULL_SIZE and saved as a JPEG under `out`, same layout."""
    for photo in sorted(data.rglob("*")):
        if photo.suffix.lower() in (".jpg", ".jpeg", ".png"):
            target = (out / photo.relative_to(data)).with_suffix(".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(photo) as im:
                im.convert("RGB").resize(FULL_SIZE, Image.BICUBIC).save(target, quality=90)


def bare_session(model: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # ONNX Runtime's default threads


def bare_pass(session, paths, p) -> None:
    for start in range(0, len(paths), 32):
        images = np.stack([preprocess(decode_image(x, min_size=p.resize_size), p) for x in paths[start:start + 32]])
        session.run(None, {"image": images})  # (B, D)


def timed_rounds(runs: dict, rounds: int) -> dict[str, float]:
    best = {}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def measure(backbone, paths: list[Path], rounds: int, workers: int) -> dict[str, float]:
    p, view = backbone.preprocessing, centre_view(backbone)
    session = bare_session(frozen_pass._export(backbone))
    decoded = np.stack([preprocess(decode_image(x, min_size=p.resize_size), p) for x in paths])
    ours = lambda: extract_features(backbone, paths, view, engine="onnx",  # noqa: E731
                                    num_workers=workers, progress=False)
    real = frozen_pass.share_cores

    def before():
        frozen_pass.share_cores = lambda n, device: (1, 1)
        try:
            ours()
        finally:
            frozen_pass.share_cores = real

    runs = {"floor: PyTorch eager pass": lambda: extract_features(backbone, paths, view, engine="torch",
                                                                  num_workers=workers, progress=False),
            "ours: ONNX Runtime pass": ours,
            "before: 1 decode process + 1 engine thread": before,
            "bare ORT session (decode + preprocess + run)": lambda: bare_pass(session, paths, p),
            "bare ORT inference only (decoded beforehand)":
                lambda: [session.run(None, {"image": decoded[i:i + 32]}) for i in range(0, len(decoded), 32)]}
    before()  # the export and sessions made before timing
    ours()
    return {name: len(paths) / seconds for name, seconds in timed_rounds(runs, rounds).items()}


def check_draft(backbone, full: Path, train_photos: int) -> None:
    """Test accuracy of a linear head on full-size photos, with and without reduced-size decoding."""
    p = backbone.preprocessing
    train = FlowerFolder(split_dir(full, "train"))
    test = FlowerFolder(split_dir(full, "test"), classes=train.classes)
    train.samples = train.samples[::max(1, len(train.samples) // train_photos)]  # every category, fewer photos
    views = {"reduced-size decoding (as trained and predicted)": centre_view(backbone),
             "full decoding": View("centre", centre_view(backbone).transform)}
    feats = {}
    for name, view in views.items():
        for split, folder in (("train", train), ("test", test)):
            x, _ = extract_features(backbone, [q for q, _ in folder.samples], view, engine="onnx", num_workers=2,
                                    progress=False)
            feats[name, split] = x
    y_train = torch.tensor([y for _, y in train.samples])
    y_test = torch.tensor([y for _, y in test.samples])
    for fit_on in views:
        torch.manual_seed(0)
        head = torch.nn.Linear(backbone.feature_dim, len(train.classes))
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")
        x = feats[fit_on, "train"]

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x), y_train) + 1e-4 * head.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            accuracy = {name: (head(feats[name, "test"]).argmax(1) == y_test).float().mean().item() for name in views}
        print(f"head fitted on {fit_on}: test accuracy " + ", ".join(f"{n} {100 * a:.2f}%" for n, a in accuracy.items())
              + f" ({len(y_test)} photos)")
    a, b = feats[list(views)[0], "test"], feats[list(views)[1], "test"]
    cosine = torch.nn.functional.cosine_similarity(a, b).min().item()
    print(f"test features, reduced-size vs full decoding: least cosine similarity {cosine:.4f} "
          f"(decoded at {decode_image(test.samples[0][0], min_size=p.resize_size).size} instead of "
          f"{decode_image(test.samples[0][0]).size})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a data folder with train/ (e.g. ../shared/data/flower_photos_2k)")
    parser.add_argument("--full", help="folder of full-size copies (made there if empty; put it under /tmp)")
    parser.add_argument("--images", type=int, default=320, help="photos per set (default 320)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, fastest kept (default 2)")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--check_draft", action="store_true", help="also the accuracy check (needs --full)")
    parser.add_argument("--draft_train", type=int, default=600, help="training photos for that check (default 600)")
    args = parser.parse_args()
    backbone = build_backbone(args.arch)
    workers = TrainConfig().num_workers
    sets = {f"{backbone.preprocessing.input_size} px": Path(args.data)}
    if args.full:
        full = Path(args.full)
        if not any(full.rglob("*.jpg")):
            make_full_size(Path(args.data), full)
        sets[f"full-size ({FULL_SIZE[0]}x{FULL_SIZE[1]} JPEG)"] = full
    chosen = frozen_pass.share_cores(workers, torch.device("cpu"))
    print(f"{args.arch}, {cpu_cores()} cores; our pass: {chosen[0]} decode worker processes "
          f"({'a decoding thread beside the engine' if not chosen[0] else 'beside the engine'}), "
          f"{chosen[1]} engine threads; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, folder in sets.items():
        paths = [q for c in sorted((folder / "train").iterdir()) for q in list_photos(c)]
        paths = paths[::max(1, len(paths) // args.images)][:args.images]  # every category
        rates = measure(backbone, paths, args.rounds, workers)
        bare = rates["bare ORT session (decode + preprocess + run)"]
        print(f"\n{name}, {len(paths)} photos (fastest of {args.rounds} rounds)")
        print(f"| {'pass':<45} | images/s | / bare ORT |")
        print(f"|{'-' * 47}|---------:|----------:|")
        for run, rate in rates.items():
            print(f"| {run:<45} | {rate:8.1f} | {rate / bare:9.2f} |")
    if args.check_draft and args.full:
        print()
        check_draft(backbone, Path(args.full), args.draft_train)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(1, 5, 15 min; the machine may be shared with other jobs)")


if __name__ == "__main__":
    main()
