"""Peak memory of the server for one upload at the limits: each case in a fresh process (the app
around a tiny exported model, one POST /predict through TestClient), its peak RSS (VmHWM, Linux)
with the app ready and after the request.

    python bench/upload_memory.py [--cases rgba,palette,...] [--out /tmp/upload_memory]

The photos are 8000x8000 (the 64,000,000-pixel limit) in the modes that cost most per pixel, and
the widest panorama the aspect limit admits, each made small enough for the 10 MB upload limit.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE = 8000  # 8000 x 8000 = the pixel limit


def make(case: str, path: Path) -> None:
    import numpy as np
    from PIL import Image

    stripes = np.zeros((SIDE, SIDE), dtype=np.uint8)
    stripes[:, ::64] = 255  # compresses well, yet is not one colour
    if case == "rgb":
        Image.fromarray(np.stack([stripes] * 3, axis=-1)).save(path, "PNG")
    elif case == "rgba":
        Image.fromarray(np.stack([stripes] * 4, axis=-1)).save(path, "PNG")
    elif case == "palette":
        Image.fromarray(stripes).convert("P").save(path, "PNG", transparency=0)
    elif case == "grey16":
        Image.fromarray(stripes.astype(np.uint16) * 257).save(path, "PNG")
    elif case == "int32_tiff":
        Image.fromarray(stripes.astype(np.int32) * 1000).save(path, "TIFF", compression="tiff_adobe_deflate")
    elif case == "float_tiff":
        Image.fromarray(stripes.astype(np.float32)).save(path, "TIFF", compression="tiff_adobe_deflate")
    elif case == "bilevel":
        Image.fromarray(stripes).convert("1").save(path, "PNG")
    elif case == "cmyk_jpeg":
        Image.fromarray(np.stack([stripes] * 3, axis=-1)).convert("CMYK").save(path, "JPEG", quality=50)
    elif case == "panorama":  # 61:1 at the pixel limit: 62,464 x 1,024
        wide = np.zeros((1024, 62_464), dtype=np.uint8)
        wide[:, ::64] = 255
        Image.fromarray(wide).convert("RGB").save(path, "PNG")
    else:
        raise SystemExit(f"unknown case {case}")


def measure(model: str, photo: str) -> dict:
    """In this (fresh) process: peak RSS with the app ready, then after the upload."""
    from fastapi.testclient import TestClient

    from flower_classifier.predictor import load_predictor
    from flower_classifier.serving import create_app

    client = TestClient(create_app(load_predictor(model)))
    warm = client.post("/predict", files={"file": ("warm.png", _tiny_png(), "image/png")})
    assert warm.status_code == 200, warm.text
    before = _peak_mb()
    data = Path(photo).read_bytes()
    response = client.post("/predict", files={"file": (Path(photo).name, data, "application/octet-stream")})
    after = _peak_mb()
    return {"status": response.status_code, "upload_mb": round(len(data) / 1e6, 2),
            "ready_mb": round(before), "peak_mb": round(after)}


def _peak_mb() -> float:
    """This process's peak resident memory (ru_maxrss would count the parent's, kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("needs Linux's /proc/self/status")


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 60, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="rgb,rgba,palette,grey16,int32_tiff,float_tiff,bilevel,cmyk_jpeg,panorama")
    p.add_argument("--out", default=None, help="folder for the photos and the model (default: a temporary one)")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # MODEL PHOTO: the child process's job
    p.add_argument("--make", nargs=2, help=argparse.SUPPRESS)  # CASE PATH
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if args.make:
        make(args.make[0], Path(args.make[1]))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="upload_memory."))
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from app_models import tiny_models

    model = tiny_models(out)["onnx"]
    print(f"{'case':<12} {'status':>6} {'upload MB':>9} {'ready MB':>8} {'peak MB':>8}")
    for case in args.cases.split(","):
        suffix = ".tif" if "tiff" in case else ".jpg" if "jpeg" in case else ".png"
        photo = out / f"{case}{suffix}"
        if not photo.exists():
            subprocess.run([sys.executable, __file__, "--make", case, str(photo)], check=True)
        result = json.loads(subprocess.run([sys.executable, __file__, "--measure", str(model), str(photo)],
                                           check=True, capture_output=True, text=True).stdout)
        print(f"{case:<12} {result['status']:>6} {result['upload_mb']:>9} {result['ready_mb']:>8} "
              f"{result['peak_mb']:>8}", flush=True)


if __name__ == "__main__":
    main()
