"""ONNX vs PyTorch for one photo: file size, latency (decoded photo -> top-5) and cold start
(`predict.py` in a fresh process, imports and model loading included).

    python bench/bench_export.py CHECKPOINT [--onnx model.onnx] [--photo tests/data/rose.jpg] [--runs 50]

Exports CHECKPOINT to a temporary .onnx file unless --onnx is given.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flower_classifier.checkpoint import load_model  # noqa: E402
from flower_classifier.export import export_onnx  # noqa: E402
from flower_classifier.images import decode_image  # noqa: E402
from flower_classifier.predictor import OnnxPredictor, predict  # noqa: E402


def timings_ms(fns: dict, runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds per call of each function, taking turns, so a busy machine slows all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(1000 * (time.perf_counter() - start))
    return out


def cold_start_s(photo: Path, model: Path, repeats: int = 3) -> float:
    """Best of `repeats` wall times of `python predict.py PHOTO MODEL` (the page cache is warm).
    predict.py has no thread option: it runs with each library's default, see `fresh_torch_threads`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "predict.py", str(photo), str(model)], cwd=ROOT, check=True,
                       capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def fresh_torch_threads() -> int:
    """The threads torch takes in a fresh process with this environment (OMP_NUM_THREADS or the cores)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], check=True,
                         capture_output=True, text=True)
    return int(out.stdout)


def onnx_threads(session: OnnxPredictor) -> int:
    return session.session.get_session_options().intra_op_num_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--onnx", default=None, help="an exported model (default: export CHECKPOINT to a temp file)")
    p.add_argument("--photo", default=str(ROOT / "tests/data/rose.jpg"), help="photo to classify")
    p.add_argument("--runs", type=int, default=50, help="timed runs per runtime (default: 50)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads each runtime may use for one image (default: each library's own, the CPU count)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(args.onnx) if args.onnx else export_onnx(args.checkpoint, Path(tmp) / "model.onnx")
        image = decode_image(args.photo)
        model, ckpt = load_model(args.checkpoint)
        if args.threads:
            torch.set_num_threads(args.threads)
        session = OnnxPredictor(onnx_path, threads=args.threads)
        ms = timings_ms({"torch": lambda: predict(image, model, 5), "onnx": lambda: session.predict(image, 5)},
                        args.runs)
        torch_ms, onnx_ms = ms["torch"], ms["onnx"]
        threads = {"torch": torch.get_num_threads(), "onnx": onnx_threads(session)}  # what the latency used
        # predict.py, as a user runs it, takes each library's default: label the cold starts with those.
        cold_threads = {"torch": fresh_torch_threads(), "onnx": onnx_threads(OnnxPredictor(onnx_path))}
        torch_cold = cold_start_s(Path(args.photo), Path(args.checkpoint))
        onnx_cold = cold_start_s(Path(args.photo), onnx_path)
        ckpt_mb = os.path.getsize(args.checkpoint) / 1e6
        onnx_mb = onnx_path.stat().st_size / 1e6

    def q(values, fraction):
        return sorted(values)[min(len(values) - 1, int(fraction * len(values)))]

    print(f"{ckpt.arch}, {len(ckpt.classes)} classes; {os.cpu_count()} CPUs (load average "
          f"{os.getloadavg()[0]:.1f}); {args.runs} runs on {args.photo}")
    print(f"{'runtime':<22}{'file MB':>9}{'threads':>9}{'p50 ms':>9}{'p95 ms':>9}{'cold start s':>14}{'threads':>9}")
    for label, key, mb, ms, cold in (("PyTorch (checkpoint)", "torch", ckpt_mb, torch_ms, torch_cold),
                                     ("ONNX Runtime", "onnx", onnx_mb, onnx_ms, onnx_cold)):
        print(f"{label:<22}{mb:>9.1f}{threads[key]:>9}{statistics.median(ms):>9.1f}{q(ms, .95):>9.1f}"
              f"{cold:>14.2f}{cold_threads[key]:>9}")
    print("(the checkpoint holds only the head; the backbone's weights come from its package. "
          "Latency: decoded photo -> top-5, preprocessing included, with the first threads column; "
          "cold start: predict.py in a fresh process, with each library's default threads, the second column.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
