"""The commands that take a trained model to apps: export (checkpoint -> one ONNX file) and serve
(the web page and JSON API; an .onnx model is served without importing torch)."""
from __future__ import annotations

import argparse

from ..config import Number
from ..errors import UserError
from .options import add_shared
from .predict import check_model_file


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint saved by train.py")
    p.add_argument("out", help="ONNX file to write, e.g. model.onnx")
    add_shared(p, "--overwrite")


def run_export(args: argparse.Namespace) -> int:
    check_model_file(args.checkpoint, onnx=False)
    from ..export import export_onnx

    path = export_onnx(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB): try `python predict.py PHOTO {path}` "
          f"or `python -m flower_classifier serve {path}`")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an exported .onnx model (no torch needed) or a checkpoint (.pth)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for other machines "
                   "(default: 127.0.0.1)")
    p.add_argument("--port", type=Number(int, 1, 65535).parse, default=8000, help="port (default: 8000)")
    # A photo is a few MB; 1 GB is far past any camera, and the decoder has its own pixel budget.
    p.add_argument("--max_upload_mb", type=Number(float, 0, 1024, lo_open=True).parse, default=10.0,
                   help="largest photo accepted, in MB (default: 10)")
    # Each run already uses every core: more than 64 at once only queues for memory.
    p.add_argument("--parallel", type=Number(int, 1, 64).parse, default=1,
                   help="model runs at once; each already uses every CPU core (default: 1)")
    add_shared(p, "--tta", tta={"help": "test-time augmentation by default: the model also sees each photo mirrored "
                                "left-right, about twice the time; a request's ?tta=false or ?tta=true overrides "
                                "it (default: off)"})


def run_serve(args: argparse.Namespace) -> int:
    check_model_file(args.model, onnx=args.model.lower().endswith(".onnx"))
    try:
        from ..serving import serve
    except ImportError as e:
        raise UserError(f"serving needs the app packages ({e.name} is missing): "
                        f"`pip install -r requirements.txt`") from None
    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, parallel=args.parallel,
          tta=args.tta)
    return 0
