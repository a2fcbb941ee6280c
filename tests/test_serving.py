"""The web app's API, served by uvicorn on a loopback port: answers, refusals (non-image, too
large, empty), and many clients at once."""
import contextlib
import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from app_models import free_port, live_server, photo, tiny_checkpoint
from conftest import ROOT
from flower_classifier import serving
from flower_classifier.cli import main
from flower_classifier.export import export_onnx
from flower_classifier.serving import create_app, load_predictor

SUNFLOWER = photo("sunflower.jpg").read_bytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    ckpt = tiny_checkpoint(tmp / "tiny.pth")
    return {"pytorch": ckpt, "onnx": export_onnx(ckpt, tmp / "tiny.onnx")}


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
        assert client.get("/health").json() == {"status": "ok", "backend": backend, "arch": "tiny", "classes": 6}
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


def test_too_many_pixels_gets_413(client, monkeypatch):
    monkeypatch.setattr(serving, "MAX_PIXELS", 200 * 200)
    response = upload(client, SUNFLOWER)  # 224 x 224
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def test_the_page_and_the_api_description_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'accept="image/*" capture' in page.text
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body


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
             "from flower_classifier.serving import create_app, load_predictor\n"
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
