"""The web app's API, served by uvicorn on a loopback port: answers, refusals (non-image, too
large, empty), and many clients at once."""
import contextlib
import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from app_models import free_port, live_server, photo, png_claiming, tiny_checkpoint, tiny_models
from conftest import ROOT
from flower_classifier.cli import main
from flower_classifier.export import export_onnx
from flower_classifier.images import MAX_IMAGE_PIXELS
from flower_classifier.predictor import load_predictor
from flower_classifier.serving import create_app

SUNFLOWER = photo("sunflower.jpg").read_bytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("serving"))


@contextlib.contextmanager
def serve(model, **options):
    """An httpx client of the app serving `model` on a free loopback port."""
    with live_server(create_app(load_predictor(model), **options)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def client(models):
    with serve(models["onnx"], max_upload_mb=0.05) as http:
        yield http


def upload(client, data: bytes, name="flower.jpg", **params):
    return client.post("/predict", files={"file": (name, data, "image/jpeg")}, params=params)


def noise_png(width: int, height: int) -> bytes:
    """Random pixels: a PNG that does not compress, so its size is about 3 bytes a pixel."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_a_photo_gets_five_names_with_probabilities(models, backend):
    with serve(models[backend]) as client:
        assert client.get("/health").json() == {"status": "ok", "backend": backend, "arch": "tiny", "classes": 6,
                                                "tta": False}
        response = upload(client, SUNFLOWER)
    assert response.status_code == 200
    rows = response.json()["predictions"]
    assert len(rows) == 5 and all(r["name"] == f"flower {r['category']}" for r in rows)
    probs = [r["probability"] for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_both_backends_agree(models):
    answers = []
    for backend in ("onnx", "pytorch"):
        with serve(models[backend]) as client:
            answers.append(upload(client, SUNFLOWER, top_k=6).json()["predictions"])
    assert [r["category"] for r in answers[0]] == [r["category"] for r in answers[1]]
    np.testing.assert_allclose([r["probability"] for r in answers[0]], [r["probability"] for r in answers[1]],
                               atol=1e-4)


def test_a_text_file_is_refused_with_a_clear_message(client):
    response = client.post("/predict", files={"file": ("notes.txt", b"hello, not a photo", "text/plain")})
    assert response.status_code == 415
    assert response.json()["detail"].startswith("'notes.txt': not a readable image")


def test_an_empty_file_and_a_bad_top_k_are_refused(client):
    assert upload(client, b"").status_code == 400
    response = upload(client, SUNFLOWER, top_k=7)
    assert response.status_code == 400 and "between 1 and the model's 6" in response.json()["detail"]
    assert upload(client, SUNFLOWER, top_k=0).status_code == 422
    assert client.post("/predict").status_code == 422  # no file at all


def test_oversize_uploads_get_413(client):
    """The cap is 50 kB here: a 60 kB file passes the request limit (cap + multipart slack) and is
    refused by the endpoint; a 200 kB file is refused from its Content-Length, before parsing."""
    for size in (60_000, 200_000):
        data = noise_png(int((size / 3) ** 0.5), int((size / 3) ** 0.5))
        assert len(data) > 50_000
        response = upload(client, data, name="big.png")
        assert response.status_code == 413, len(data)
        assert "larger than" in response.json()["detail"]


def test_a_chunked_upload_over_the_cap_gets_413(client):
    """No Content-Length: the body is counted as it arrives and refused past the limit."""
    boundary = "xyz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    chunks = [head] + [b"\0" * 10_000] * 20 + [f"\r\n--{boundary}--\r\n".encode()]
    response = client.post("/predict", content=iter(chunks),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    small = [head, SUNFLOWER, f"\r\n--{boundary}--\r\n".encode()]
    response = client.post("/predict", content=iter(small),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200


def test_the_documented_pixel_limit_applies_before_decoding(models, monkeypatch):
    """64,000,000 pixels (README, Web app), the same limit as the command line's. A 1 kB file whose
    header claims one pixel more is refused without the decoder running; one at the limit goes on to
    the decoder (which finds no pixel data in it: 415)."""
    assert MAX_IMAGE_PIXELS == 64_000_000
    decoded = []
    real_load = ImageFile.ImageFile.load  # what every format's decoding goes through
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    with serve(models["onnx"]) as client:
        over = upload(client, png_claiming(8000, 8001), name="huge.png")
        assert over.status_code == 413 and decoded == []
        assert over.json()["detail"] == ("'huge.png': too large to read (8000x8001 pixels; the limit is "
                                         "64,000,000)")
        at = upload(client, png_claiming(8000, 8000), name="at_limit.png")
        assert at.status_code == 415 and "'at_limit.png': not a readable image" in at.json()["detail"]
        assert decoded == [(8000, 8000)]


def test_the_page_and_the_api_description_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'accept="image/*" capture' in page.text
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    for path in ("/predict", "/predict/batch"):  # every refusal described as the one-line shape it has
        for status in ("400", "413", "422", "500"):
            answer = spec["paths"][path]["post"]["responses"][status]["content"]["application/json"]["schema"]
            assert answer == {"$ref": "#/components/schemas/Refusal"}, (path, status, answer)
    assert spec["components"]["schemas"]["Refusal"]["properties"]["detail"]["type"] == "string"


def test_sixteen_clients_at_once_all_get_answers(models):
    """16 requests in flight at once, 32 in all (three photos, then a refusal)."""
    photos = [photo(n).read_bytes() for n in ("daisy.jpg", "rose.jpg", "sunflower.jpg")]
    with serve(models["onnx"]) as http:
        def send(i):
            return http.post("/predict", files={"file": (f"{i}.jpg", photos[i % 3], "image/jpeg")})

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(send, range(32)))
        refused = http.post("/predict", files={"file": ("a.txt", b"text", "text/plain")})
    assert [r.status_code for r in responses] == [200] * 32
    first = {i % 3: r.json()["predictions"] for i, r in enumerate(responses) if i < 3}
    for i, r in enumerate(responses):  # the same photo gets the same answer under load
        assert [row["category"] for row in r.json()["predictions"]] == [row["category"] for row in first[i % 3]]
    assert refused.status_code == 415


def test_serving_an_onnx_model_never_imports_torch(models):
    probe = ("import sys\n"
             "from flower_classifier.predictor import load_predictor\n"
             "from flower_classifier.serving import create_app\n"
             f"predictor = load_predictor({str(models['onnx'])!r})\n"
             "create_app(predictor)\n"
             f"assert predictor.predict({str(photo('rose.jpg'))!r}).names\n"
             "print('TORCH', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "TORCH False", result.stderr


def test_the_serve_command_starts_a_server_and_reports_mistakes(models, capsys):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flower_classifier", "serve", str(models["onnx"]),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert "Serving" in server.stdout.readline()
        for _ in range(100):
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").json()["backend"] == "onnx"
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not answer")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert main(["serve", "missing.onnx"]) == 2
    assert "missing.onnx not found" in capsys.readouterr().err


def test_a_model_with_three_categories_answers_with_three_by_default(tmp_path):
    """The default top_k means "up to 5" (the page sends none); more than the model has is a 400."""
    small = export_onnx(tiny_checkpoint(tmp_path / "three.pth", num_classes=3), tmp_path / "three.onnx")
    with serve(small) as client:
        assert len(upload(client, SUNFLOWER).json()["predictions"]) == 3
        assert upload(client, SUNFLOWER, top_k=2).status_code == 200
        response = upload(client, SUNFLOWER, top_k=4)
        assert response.status_code == 400
        assert response.json()["detail"] == "?top_k must be between 1 and the model's 3 categories (got 4)"
    assert "top_k" not in (ROOT / "flower_classifier" / "static" / "app.js").read_text()


def test_head_answers_and_a_slow_upload_is_timed_out(models):
    with live_server(create_app(load_predictor(models["onnx"]), body_timeout_s=1)) as url:
        assert httpx.head(url + "/").status_code == 200
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as stalled:
            stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                            b"Content-Length: 5000\r\n\r\n--b\r\n")  # then nothing more
            start = time.monotonic()
            reply = b""
            while chunk := stalled.recv(1000):  # the server closes the connection after its answer
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408") and "upload not received within 1 s" in reply
        assert time.monotonic() - start < 5
        with httpx.Client(base_url=url) as client:  # and the server still answers others
            assert upload(client, SUNFLOWER).status_code == 200


def test_a_model_that_answers_nan_is_a_500_not_a_null_probability(models, monkeypatch):
    """Refused at load when broken for every photo (test_predictor); if a photo still makes the
    outputs non-finite, the request fails in one clear line."""
    predictor = load_predictor(models["onnx"])
    monkeypatch.setattr(predictor, "outputs", lambda images: (np.full((len(images), 6), np.nan, np.float32),
                                                              np.full((len(images), 16), np.nan, np.float32)))
    with live_server(create_app(predictor)) as url, httpx.Client(base_url=url) as client:
        response = upload(client, SUNFLOWER)
    assert response.status_code == 500
    assert "the model's outputs are not finite numbers" in response.json()["detail"]


def test_a_busy_port_is_one_line_and_exit_2_before_any_serving_line(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "flower_classifier", "serve", str(models["onnx"]),
                                 "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_thin_photo_is_413_before_decoding(client, monkeypatch):
    """Preprocessing scales the shorter side up: a 1x12,000 PNG of 132 bytes would have cost GBs,
    a header claiming 1x64,000,000 a plain 500. Both are refused from the header."""
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    for width, height in ((1, 12_000), (12_000, 1), (1, 64_000_000), (2, 200)):
        response = upload(client, png_claiming(width, height), name="strip.png")
        assert response.status_code == 413, response.text
        assert response.json()["detail"].startswith(f"'strip.png': too thin to use ({width}x{height} pixels")
    batch = client.post("/predict/batch", files=[("files", ("strip.png", png_claiming(1, 12_000), "image/png")),
                                                 ("files", ("sunflower.jpg", SUNFLOWER, "image/jpeg"))])
    assert [r["status"] for r in batch.json()["results"]] == [413, 200]
    assert decoded and all(max(size) < 61 * min(size) for size in decoded)  # only the sunflower was decoded


@pytest.mark.parametrize("value", ["1", "0", "yes", "no", "on", "t", "y", "", "truee", "x" * 5_000])
@pytest.mark.parametrize("flag", ["tta", "no_unknown"])
@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
def test_on_off_flags_take_only_true_or_false(client, flag, value, path):
    field = "file" if path == "/predict" else "files"
    response = client.post(path, files={field: ("f.jpg", SUNFLOWER, "image/jpeg")}, params={flag: value})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.startswith(f"?{flag}=") and detail.endswith("must be true or false")
    assert len(detail) < 200


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
@pytest.mark.parametrize("params, start, rule", [
    ({"top_k": "abc"}, "?top_k='abc': ", "must be a whole number between 1 and the model's 6 categories"),
    ({"top_k": "0"}, "?top_k='0': ", "must be a whole number between 1 and the model's 6 categories"),
    ({"top_k": "2.5"}, "?top_k='2.5': ", "must be a whole number between 1 and the model's 6 categories"),
    ({"top_k": "x" * 5_000}, "?top_k='xxx", "must be a whole number between 1 and the model's 6 categories"),
    ({"topk": "3"}, "'topk' is not a parameter of /predict", "it takes ?top_k=, ?no_unknown=, ?tta="),
])
def test_a_bad_query_parameter_is_one_line_naming_it(client, path, params, start, rule):
    """Not FastAPI's list of validation errors: the one-line {"detail": ...} of every other refusal."""
    field = "file" if path == "/predict" else "files"
    response = client.post(path, files={field: ("f.jpg", SUNFLOWER, "image/jpeg")}, params=params)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.startswith(start) and detail.endswith(rule), detail
    assert len(detail) < 250 and "\n" not in detail


@pytest.mark.parametrize("path, field", [("/predict", "file"), ("/predict/batch", "files")])
def test_a_missing_or_non_file_field_is_one_line_naming_it(client, path, field):
    for body in ({}, {"data": {field: "not a file"}}):
        detail = client.post(path, **body).json()["detail"]
        assert isinstance(detail, str) and f"'{field}'" in detail and "multipart/form-data" in detail, detail


def test_a_page_or_health_check_with_a_query_is_still_answered(client):
    """Only the API's routes refuse parameters they do not take: a link to the page may carry any."""
    assert client.get("/", params={"utm_source": "x"}).status_code == 200
    assert client.get("/health", params={"probe": "1"}).status_code == 200


@pytest.mark.parametrize("value, on", [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_true_and_false_in_any_case_are_the_flag(client, value, on):
    response = upload(client, SUNFLOWER, tta=value)
    assert response.status_code == 200 and response.json()["tta"] is on
    assert upload(client, SUNFLOWER, no_unknown=value).status_code == 200
