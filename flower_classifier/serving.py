"""The web app: a page where a person photographs or drops a flower and sees its top-5 names, and a
JSON API (`POST /predict`, described at /openapi.json) for other apps. FastAPI + uvicorn.

Runs an exported .onnx model (onnxruntime, no torch) or a checkpoint (.pth, PyTorch). Uploads are
read into memory, capped in size and in pixels, decoded with Pillow; nothing is written to disk
but what the multipart parser spools into the system's temporary folder. Requests are served by a
thread pool; at most `parallel` model runs happen at once (one run already uses every CPU core, so
more would only make them wait for each other), while decoding and resizing run side by side.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .errors import UserError
from .images import ImageTooLarge, decode_image
from .runtime import OnnxClassifier, Prediction, check_top_k

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 10.0
MAX_PIXELS = 50_000_000  # a 50-megapixel photo decodes to 150 MB; a tiny PNG can claim far more
MULTIPART_SLACK = 64 * 1024  # room for the multipart headers around the file


class TorchPredictor:
    """A checkpoint behind the same face as `runtime.OnnxClassifier`: classes, names, predict()."""

    def __init__(self, path: str | Path):
        from .checkpoint import load_model

        self.model, ckpt = load_model(path)
        self.arch, self.classes, self.cat_to_name = ckpt.arch, self.model.classes, self.model.cat_to_name

    def predict(self, image, top_k: int = 5) -> Prediction:
        from .prediction import predict

        return predict(image, self.model, top_k)  # eval mode, inference_mode: safe from several threads


def load_predictor(path: str | Path):
    """An .onnx file runs on onnxruntime; anything else is read as a checkpoint."""
    return OnnxClassifier(path) if str(path).lower().endswith(".onnx") else TorchPredictor(path)


# ---------------------------------------------------------------- API schema (shown at /docs)

class Row(BaseModel):
    name: str  # flower name, or the category when the model has no names
    category: str  # category folder name
    probability: float


class PredictResponse(BaseModel):
    predictions: list[Row]  # most likely first
    milliseconds: float  # time spent decoding and running the model


class Health(BaseModel):
    status: str
    backend: str  # "onnx" or "pytorch"
    arch: str
    classes: int


# ---------------------------------------------------------------- request size limit

class BodyLimit:
    """ASGI middleware: a POST body over `max_bytes` gets 413 before it is parsed. A declared
    Content-Length is checked up front; a chunked body is read here, never past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large(send)
            return await self.app(scope, receive, send)  # the server delivers no more than declared
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        body = json.dumps({"detail": f"upload larger than {self.max_bytes / 1e6:.1f} MB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the app

def create_app(predictor, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, parallel: int = 1) -> FastAPI:
    max_bytes = int(max_upload_mb * 1e6)
    model_slots = threading.BoundedSemaphore(parallel)
    backend = "onnx" if isinstance(predictor, OnnxClassifier) else "pytorch"
    app = FastAPI(title="Flower classifier", version="1",
                  description="Name the flower in a photo: top-K species with probabilities.")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    def health():
        return Health(status="ok", backend=backend, arch=predictor.arch, classes=len(predictor.classes))

    @app.post("/predict", response_model=PredictResponse,
              responses={400: {"description": "empty upload"}, 413: {"description": "file or image too large"},
                         415: {"description": "not an image"}})
    def predict(file: UploadFile = File(..., description="a photo: JPEG, PNG, WebP, ..."),
                top_k: int = Query(5, ge=1, description="how many species to return")):
        """The top-K species for one uploaded photo (multipart/form-data, field `file`)."""
        start = time.perf_counter()
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{file.filename!r} is larger than {max_upload_mb:g} MB")
        if not data:
            raise HTTPException(400, f"{file.filename!r} is empty")
        try:
            check_top_k(top_k, len(predictor.classes))
        except UserError as e:
            raise HTTPException(400, str(e).replace("--top_k", "top_k")) from None
        try:
            image = decode_image(data, max_pixels=MAX_PIXELS)
        except ImageTooLarge as e:
            raise HTTPException(413, str(e).replace("upload", repr(file.filename), 1)) from None
        except UserError as e:
            raise HTTPException(415, str(e).replace("upload", repr(file.filename), 1)) from None
        with model_slots:
            result = predictor.predict(image, top_k)
        rows = [Row(name=n, category=c, probability=p) for n, c, p in result.rows()]
        return PredictResponse(predictions=rows, milliseconds=round(1000 * (time.perf_counter() - start), 1))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=max_bytes + MULTIPART_SLACK)
    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, parallel: int = 1) -> None:
    import uvicorn

    predictor = load_predictor(model)
    app = create_app(predictor, max_upload_mb=max_upload_mb, parallel=parallel)
    print(f"Serving {model} ({len(predictor.classes)} categories) on http://{host}:{port}/  "
          f"(API: POST /predict, docs at /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
