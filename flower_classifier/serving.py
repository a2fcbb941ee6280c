"""The web app: a page where a person photographs or drops a flower and sees its top names, and a
JSON API (`POST /predict`, and `POST /predict/batch` for several photos at once, described at
/openapi.json) for other apps. FastAPI + uvicorn.

Runs an exported .onnx model (onnxruntime, no torch) or a checkpoint (.pth, PyTorch), through
`predictor.load_predictor`. Memory is bounded: an upload is capped in bytes (`max_upload_mb`) and
must arrive within BODY_TIMEOUT_S; its pixel count is read from the header and checked against
`images.MAX_IMAGE_PIXELS` before decoding; large JPEGs are decoded at reduced size; at most
DECODES_AT_ONCE decodes run at once, and at most `parallel` model runs (one run already uses every
CPU core, so more would only make them wait for each other). Nothing is written to disk but what
the multipart parser spools into the system's temporary folder.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import socket
import threading
import time
import typing
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .errors import UserError, quoted
from .images import ImageTooLarge
from .predictor import NonFiniteOutput, check_top_k, load_predictor

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 10.0
MULTIPART_SLACK = 64 * 1024  # room for the multipart headers around the file
DECODES_AT_ONCE = 2  # a decode at the pixel limit holds about 200 MB (more while converting)
BODY_TIMEOUT_S = 60.0  # the whole upload must arrive within this (a stalled or very slow client gets 408)
KEEP_ALIVE_S = 5  # an idle connection is closed after this
MAX_CONNECTIONS = 64  # beyond this uvicorn answers 503: each request in flight holds up to 2 uploads' bytes
# POST /predict/batch: photos per request. Its body may hold this many uploads, each within the
# per-file limit, and one model run takes them all at once.
MAX_BATCH_FILES = 16


# ---------------------------------------------------------------- API schema (shown at /docs)

class Row(BaseModel):
    name: str  # flower name, or the category when the model has no names
    category: str  # category folder name
    probability: float


class PredictResponse(BaseModel):
    predictions: list[Row]  # most likely first; calibrated probabilities
    unknown: bool | None  # none of the species the model knows; null: not asked (no_unknown, or no calibration)
    score: float | None  # the unknown score (higher = less like the species); null for a model without calibration
    species: int  # how many species the model knows
    tta: bool  # whether the answer averages the photo and its mirror image (test-time augmentation)
    milliseconds: float  # time spent decoding and running the model


class BatchItem(BaseModel):
    filename: str
    status: int  # what POST /predict would answer for this photo alone: 200, or 400, 413, 415
    predictions: list[Row] | None = None  # when status is 200
    unknown: bool | None = None  # as in PredictResponse, when status is 200
    score: float | None = None
    error: str | None = None  # otherwise: what is wrong with this photo


class BatchResponse(BaseModel):
    results: list[BatchItem]  # one per uploaded file, in the order sent
    tta: bool  # as in PredictResponse
    milliseconds: float


class Refusal(BaseModel):
    detail: str  # one line: what is wrong with the request, and what to send instead


def refusals(descriptions: dict[int, str]) -> dict[int, dict]:
    """A route's error answers for the API description (status -> when), each a `Refusal`."""
    return {status: {"description": text, "model": Refusal} for status, text in descriptions.items()}


class Health(BaseModel):
    status: str
    backend: str  # "onnx" or "pytorch"
    arch: str
    classes: int
    tta: bool  # whether a request that does not say (?tta=) gets test-time augmentation: `serve --tta`


# ---------------------------------------------------------------- refusing a request's parameters

BAD_REQUEST = "a query parameter or upload field missing, of the wrong kind, or not one the route takes"
FLAG_VALUES = {"true": True, "false": False}  # the one spelling of an on/off flag (any case); not 1, yes, on


def strict_query(request: Request) -> None:
    """Refuse, before FastAPI's own parsing, a query parameter the route does not take (a typo such
    as ?topk=3 would otherwise be ignored in silence) and any on/off flag of the route (a bool
    parameter: ?tta=, ?no_unknown=) that is not true or false, which FastAPI would also take as 1,
    yes, on, t, y. Routes without query parameters (the page, /health) are left alone."""
    route = request.scope.get("route")
    params = list(getattr(getattr(route, "dependant", None), "query_params", ()))
    if not params:
        return
    names = [param.alias for param in params]
    for name in request.query_params:
        if name not in names:
            raise HTTPException(422, f"{quoted(name)} is not a parameter of {request.url.path}; it takes "
                                     + ", ".join(f"?{n}=" for n in names))
    for param in params:
        annotation = param.field_info.annotation
        if annotation is not bool and bool not in typing.get_args(annotation):
            continue
        for value in request.query_params.getlist(param.alias):
            if value.lower() not in FLAG_VALUES:
                raise HTTPException(422, f"?{param.alias}={quoted(value)}: must be true or false")


def validation_detail(errors: typing.Sequence[dict], rules: dict[str, str]) -> str:
    """FastAPI's list of validation errors as the one line every other refusal is: what was sent,
    and what to send instead (`rules`: parameter name -> what it must be)."""
    lines = []
    for error in errors:
        where, name = error["loc"][0], str(error["loc"][1]) if error["loc"][1:] else ""  # ("body", "files", 0)
        if where == "query":
            lines.append(f"?{name}={quoted(error.get('input'))}: {rules.get(name, error['msg'])}")
        elif where == "body" and name and error["type"] == "missing":
            lines.append(f"no '{name}' field: send the photo as multipart/form-data, field '{name}'")
        elif where == "body" and name:
            lines.append(f"the field '{name}' is not a file: send the photo as multipart/form-data, field '{name}'")
        else:
            lines.append(f"{' '.join(map(str, error['loc']))}: {error['msg']}")
    return "; ".join(dict.fromkeys(lines))  # one line even for several errors, each said once


# ---------------------------------------------------------------- request size and time limit

class BodyLimit:
    """ASGI middleware: a POST body is read here in full before the app parses it, never past
    `max_bytes` (or `paths`' own limit for a path listed there; 413, a declared Content-Length is
    checked up front) and within `timeout` seconds from its first byte to its last (408), so a slow
    or stalled client cannot hold a request open."""

    def __init__(self, app, max_bytes: int, timeout: float = BODY_TIMEOUT_S, paths: dict[str, int] | None = None):
        self.app, self.max_bytes, self.timeout, self.paths = app, max_bytes, timeout, paths or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        max_bytes = self.paths.get(scope["path"], self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await self._refuse(send, 413, f"upload larger than {max_bytes / 1e6:.1f} MB")
        deadline = asyncio.get_running_loop().time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, f"upload not received within {self.timeout:g} s")
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_bytes:
                return await self._refuse(send, 413, f"upload larger than {max_bytes / 1e6:.1f} MB")
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, detail: str):
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the app

def create_app(predictor, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, parallel: int = 1,
               body_timeout_s: float = BODY_TIMEOUT_S, tta: bool = False) -> FastAPI:
    """The app around a loaded `predictor.Predictor`, which it only reads. `tta`: whether a request
    that does not say (`?tta=`) gets test-time augmentation."""
    default_tta = tta
    tta_query = Query(None, description="true or false: test-time augmentation: average the photo and its mirror image, about "
                      f"twice the time (default: {str(tta).lower()}, set by `serve --tta`)")
    max_bytes = int(max_upload_mb * 1e6)
    model_slots = threading.BoundedSemaphore(parallel)
    decode_slots = threading.BoundedSemaphore(DECODES_AT_ONCE)
    app = FastAPI(title="Flower classifier", version="1", dependencies=[Depends(strict_query)],
                  description="Name the flower in a photo: top-K species with probabilities.")

    # What each query parameter must be, for the one-line refusal of a value FastAPI cannot take.
    rules = {"top_k": f"must be a whole number between 1 and the model's {len(predictor.classes)} categories",
             "tta": "must be true or false", "no_unknown": "must be true or false"}

    @app.exception_handler(RequestValidationError)
    async def refuse(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_detail(exc.errors(), rules)}, status_code=422)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    def health():
        return Health(status="ok", backend=predictor.backend, arch=predictor.arch, classes=len(predictor.classes),
                      tta=default_tta)

    @app.post("/predict", response_model=PredictResponse,
              responses=refusals({400: "empty upload or a top_k the model cannot give", 408: "upload too slow",
                                  413: "file or image too large", 415: "not an image", 422: BAD_REQUEST,
                                  500: "the model is broken"}))
    def predict(file: UploadFile = File(..., description="a photo: JPEG, PNG, WebP, ..."),
                top_k: int | None = Query(None, ge=1, description="how many species to return (default: up to 5)"),
                no_unknown: bool = Query(False, description="true or false: never answer \"not one of the species\" "
                                         "(probabilities stay calibrated)"),
                tta: bool | None = tta_query):
        """The top-K species for one uploaded photo (multipart/form-data, field `file`)."""
        start = time.perf_counter()
        top_k, tta = checked_top_k(top_k), default_tta if tta is None else tta
        (result,) = answers([prepare(file)], top_k, no_unknown, tta)
        return PredictResponse(predictions=rows_of(result), unknown=result.unknown, score=result.score,
                               species=len(predictor.classes), tta=tta,
                               milliseconds=round(1000 * (time.perf_counter() - start), 1))

    @app.post("/predict/batch", response_model=BatchResponse,
              responses=refusals({400: "a top_k the model cannot give", 408: "upload too slow",
                                  413: f"more than {MAX_BATCH_FILES} files, or too large in all", 422: BAD_REQUEST,
                                  500: "the model is broken"}))
    def predict_batch(files: list[UploadFile] = File(..., description=f"up to {MAX_BATCH_FILES} photos, each "
                                                     f"within the per-file limit"),
                      top_k: int | None = Query(None, ge=1, description="how many species per photo (default: "
                                                "up to 5)"),
                      no_unknown: bool = Query(False, description="true or false: never answer \"not one of the species\""),
                      tta: bool | None = tta_query):
        """The top-K species for each of several photos (multipart/form-data, the field `files` once per
        photo), in one model run. A photo that cannot be read gets its own error and status; the others
        are answered."""
        start = time.perf_counter()
        if len(files) > MAX_BATCH_FILES:
            raise HTTPException(413, f"{len(files)} files: at most {MAX_BATCH_FILES} photos per request")
        top_k, tta = checked_top_k(top_k), default_tta if tta is None else tta
        items, images = [], []
        for file in files:
            try:
                images.append(prepare(file))
                items.append(BatchItem(filename=file.filename or "upload", status=200))
            except HTTPException as e:
                items.append(BatchItem(filename=file.filename or "upload", status=e.status_code, error=e.detail))
        if images:
            results = iter(answers(images, top_k, no_unknown, tta))
            for item in items:
                if item.status == 200:
                    result = next(results)
                    item.predictions, item.unknown, item.score = rows_of(result), result.unknown, result.score
        return BatchResponse(results=items, tta=tta, milliseconds=round(1000 * (time.perf_counter() - start), 1))

    def checked_top_k(top_k: int | None) -> int:
        try:
            return check_top_k(top_k, len(predictor.classes), option="?top_k")
        except UserError as e:
            raise HTTPException(400, str(e)) from None

    def prepare(file: UploadFile):
        """An upload as the model's input (3, S, S), or the HTTPException /predict answers for it."""
        label = quoted(file.filename or "upload")
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{label} is larger than {max_upload_mb:g} MB")
        if not data:
            raise HTTPException(400, f"{label} is empty")
        try:
            with decode_slots:  # decoding and resizing hold the most memory
                return predictor.prepare(data, label=label)
        except ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except UserError as e:
            raise HTTPException(415, str(e)) from None

    def answers(images: list, top_k: int, no_unknown: bool, tta: bool) -> list:
        """Calibrated top-K and the unknown answer for prepared images, in one model run."""
        try:
            with model_slots:
                return predictor.answer(np.stack(images), top_k, unknown=not no_unknown, tta=tta)
        except NonFiniteOutput as e:  # never a 200 with "probability": null
            raise HTTPException(500, str(e)) from None

    def rows_of(result) -> list[Row]:
        return [Row(name=n, category=c, probability=p) for n, c, p in result.rows()]

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=max_bytes + MULTIPART_SLACK, timeout=body_timeout_s,
                       paths={"/predict/batch": MAX_BATCH_FILES * (max_bytes + MULTIPART_SLACK)})
    return app


def give_freed_memory_back() -> None:
    """glibc keeps what a thread frees in that thread's arena for reuse, so the decoded photos of the
    request threads (up to 200 MB each) stayed in the server after their requests (2 GB after ten
    7000x7000 PNGs). With a fixed mmap threshold, every allocation of 1 MB or more is a mapping of its
    own, returned to the system when freed. Other C libraries (macOS, musl) behave otherwise: no-op."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3 in malloc.h
    except (OSError, AttributeError):
        pass


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one line saying why not (a busy port, an unknown address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while old sockets linger
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): another server may be using the "
                        f"port; choose another with --port") from None
    return sock


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, parallel: int = 1, tta: bool = False) -> None:
    import uvicorn

    give_freed_memory_back()
    predictor = load_predictor(model)
    app = create_app(predictor, max_upload_mb=max_upload_mb, parallel=parallel, tta=tta)
    sock = listen(host, port)  # before saying "Serving": a busy port is one line, not a false start
    print(f"Serving {model} ({len(predictor.classes)} categories{', test-time augmentation' if tta else ''}) on "
          f"http://{host}:{port}/  (API: POST /predict and /predict/batch, docs at /docs; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                            limit_concurrency=MAX_CONNECTIONS)
    uvicorn.Server(config).run(sockets=[sock])
