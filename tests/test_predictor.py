"""One predictor for a checkpoint and an ONNX file: what it trusts (nothing read from disk unchecked),
what it decodes (never past the pixel limit, large JPEGs at reduced size), small models with the
default top_k, and the ONNX route without torch."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image, ImageFile

from app_models import free_port, photo, png_claiming, tiny_checkpoint
from conftest import ROOT, make_image
from flower_classifier.backbones import BACKBONES
from flower_classifier.calibration import _encode
from flower_classifier.cli import main
from flower_classifier.data import eval_transform, train_transform
from flower_classifier.errors import UserError
from flower_classifier.export import export_onnx
from flower_classifier.images import MAX_IMAGE_PIXELS, ImageTooLarge, Preprocessing, decode_image
from flower_classifier.predictor import load_predictor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    ckpt = tiny_checkpoint(tmp / "tiny.pth")
    return ckpt, export_onnx(ckpt, tmp / "tiny.onnx")


@pytest.fixture
def no_decoding(monkeypatch):
    """Records every decode: each format's pixels are read through ImageFile.load."""
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    return decoded


# ---------------------------------------------------------------- decoding within the limit

def test_a_header_over_the_limit_is_refused_before_the_decoder_runs(tmp_path, no_decoding):
    assert MAX_IMAGE_PIXELS == 64_000_000  # the one limit, for the CLI and the server
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(9000, 9000))  # 81 MP claimed in 57 bytes
    with pytest.raises(ImageTooLarge, match=r"huge.png: too large to read \(9000x9000 pixels; the limit is 64,000,000\)"):
        decode_image(huge)
    with pytest.raises(ImageTooLarge, match="^'upload.png': too large"):  # the label is the caller's
        decode_image(huge.read_bytes(), label="'upload.png'")
    assert no_decoding == []


def test_the_cli_refuses_a_huge_photo_before_decoding(tiny, tmp_path, capsys, no_decoding):
    _, onnx_path = tiny
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(8001, 8000))
    assert main(["predict", str(huge), str(onnx_path)]) == 2
    assert f"{huge}: too large to read (8001x8000 pixels; the limit is 64,000,000)" in capsys.readouterr().err
    assert all(size != (8001, 8000) for size in no_decoding)  # only the load-time check's grey image


def test_large_jpegs_are_decoded_at_reduced_size_never_below_the_resize_target(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (200, 30, 90)).save(path, quality=90)
    assert decode_image(path).size == (2000, 1500)  # training reads every pixel
    drafted = decode_image(path, min_size=256)
    assert drafted.size == (500, 375) and min(drafted.size) >= 256  # 1/4: 1/8 would be 188 < 256
    assert decode_image(path, min_size=400).size == (1000, 750)
    # the limit counts the pixels decoded: too many at full size, within it at reduced size
    with pytest.raises(ImageTooLarge):
        decode_image(path, max_pixels=1_000_000)
    assert decode_image(path, max_pixels=1_000_000, min_size=256).size == (500, 375)
    png = make_image(tmp_path / "big.png", (10, 200, 10), size=(600, 400))
    assert decode_image(png, min_size=100).size == (600, 400)  # only JPEG decodes at reduced size


# ---------------------------------------------------------------- preprocessing

EXPECTED_NORMALIZATION = {  # the values each backbone's pretrained weights were trained with
    **{arch: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) for arch in
       ("vgg16", "vgg13", "resnet50", "densenet121", "efficientnet_b0", "tiny", "vit_b_16", "regnet_y_16gf",
        "convnext_tiny", "efficientnet_v2_s")},
    **{f"efficientnet_lite{v}": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for v in (0, 1, 2)},  # TF's [-1, 1]
}


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_each_backbone_normalizes_with_its_own_mean_and_std(arch, tmp_path):
    p = BACKBONES[arch].preprocessing()
    mean, std = EXPECTED_NORMALIZATION[arch]
    assert p.mean == pytest.approx(mean) and p.std == pytest.approx(std)
    colour = (200, 30, 90)
    image = Image.new("RGB", (p.resize_size + 20, p.resize_size), colour)
    out = eval_transform(p)(image)  # (3, S, S)
    assert out.shape == (3, p.input_size, p.input_size)
    for channel in range(3):  # a flat photo comes out as (value - mean) / std, channel by channel
        assert out[channel].numpy() == pytest.approx((colour[channel] / 255 - mean[channel]) / std[channel],
                                                     abs=1e-5)


def test_augmentation_changes_the_photo_and_the_centre_crop_does_not():
    p = Preprocessing(32, 32)  # resize to the crop: the centre crop keeps every pixel
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    normalized = (pixels.transpose(2, 0, 1) / 255 - np.array(p.mean)[:, None, None]) / np.array(p.std)[:, None, None]
    centre = eval_transform(p)(image).numpy()
    np.testing.assert_allclose(centre, normalized, atol=1e-5)
    np.testing.assert_array_equal(eval_transform(p)(image).numpy(), centre)  # and always the same
    torch.manual_seed(0)
    views = [train_transform(p)(image).numpy() for _ in range(3)]
    assert all(v.shape == centre.shape for v in views)
    assert all(np.abs(v - centre).mean() > 0.1 for v in views)  # augmented: not the photo itself
    assert np.abs(views[0] - views[1]).mean() > 0.1  # and not twice the same view


# ---------------------------------------------------------------- what is loaded is checked

def _edited(onnx_path, tmp_path, **changes):
    proto = onnx.load(str(onnx_path))
    meta = {m.key: m.value for m in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    out = tmp_path / "edited.onnx"
    onnx.save(proto, str(out))
    return out


GOOD_P = {"input_size": 32, "resize_size": 36, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
          "interpolation": "bilinear"}
GOOD_CAL = {"version": 1, "temperature": 1.5, "method": "msp", "threshold": 0.5, "rule": "", "arrays": {}}
METADATA_CORPUS = [
    ({"format_version": "0"}, "metadata format_version must be a positive integer (got '0')"),
    ({"format_version": "-1"}, "format_version must be a positive integer (got '-1')"),
    ({"format_version": "1.5"}, "format_version must be a positive integer (got '1.5')"),
    ({"format_version": "one"}, "format_version must be a positive integer (got 'one')"),
    ({"format_version": None}, "format_version must be a positive integer (got '')"),
    ({"format_version": "3"}, "format version 3 is newer than this code reads (2)"),
    ({"classes": "[\"1\", "}, "metadata classes is not valid JSON"),
    ({"classes": None}, "metadata lacks classes"),
    ({"classes": ["1", "2"]}, "metadata lists 2 classes but the model has 6 outputs"),
    ({"classes": [str(i) for i in range(1, 8)]}, "metadata lists 7 classes but the model has 6 outputs"),
    ({"classes": ["1", "1", "2", "3", "4", "5"]}, "metadata classes lists a category twice"),
    ({"classes": [1, 2, 3, 4, 5, 6]}, "metadata classes must be a list of category names"),
    ({"classes": {"1": 1}}, "metadata classes must be a list of category names"),
    ({"classes": []}, "metadata classes must be a list of category names"),
    ({"cat_to_name": ["daisy"]}, "metadata cat_to_name must be a mapping"),
    ({"cat_to_name": {"1": 5}}, "metadata cat_to_name must be a mapping"),
    ({"preprocessing": None}, "metadata lacks preprocessing"),
    ({"preprocessing": "null"}, "preprocessing must be a dict of input_size"),
    ({"preprocessing": {**GOOD_P, "input_size": 100000}},
     "preprocessing input_size must be a whole number of pixels from 8 to 1024 (got 100000)"),
    ({"preprocessing": {**GOOD_P, "resize_size": -5}}, "preprocessing resize_size must be a whole number of pixels"),
    ({"preprocessing": {**GOOD_P, "input_size": 32.5}}, "preprocessing input_size must be a whole number"),
    ({"preprocessing": {**GOOD_P, "input_size": True}}, "preprocessing input_size must be a whole number"),
    ({"preprocessing": {**GOOD_P, "input_size": 64}},
     "metadata preprocessing input_size 64 differs from the model's input size 32"),
    ({"preprocessing": {k: v for k, v in GOOD_P.items() if k != "mean"}}, "preprocessing mean must be 3 numbers in [0, 1], one per colour (got None)"),
    ({"preprocessing": {**GOOD_P, "std": [0, 0, 0]}}, "preprocessing std must be 3 numbers in (0, 1]"),
    ({"preprocessing": {**GOOD_P, "std": [0.2, 0.2]}}, "preprocessing std must be 3 numbers in (0, 1]"),
    ({"preprocessing": {**GOOD_P, "mean": ["a", "b", "c"]}}, "preprocessing mean must be 3 numbers in [0, 1]"),
    ({"preprocessing": {**GOOD_P, "interpolation": "cubic"}}, "preprocessing interpolation must be one of"),
    ({"calibration": "{\"version\": 1,"}, "metadata calibration is not valid JSON"),
    ({"calibration": {**GOOD_CAL, "threshold": "high"}}, "calibration field 'threshold' must be a finite number"),
    ({"calibration": {**GOOD_CAL, "temperature": 1e9}}, "calibration field 'temperature' must be within"),
    ({"calibration": {**GOOD_CAL, "method": "cosine", "arrays": {"directions": _encode(np.ones((7, 16)))}}},
     "calibration field 'arrays.directions' has shape [7, 16], which disagrees with C = 6"),
    ({"calibration": {**GOOD_CAL, "method": "cosine", "arrays": {"directions": _encode(np.ones((6, 9)))}}},
     "calibration field 'arrays.directions' has shape [6, 9], which disagrees with D = 16"),
]


@pytest.mark.parametrize("changes, needle", METADATA_CORPUS, ids=[n[:40] for _, n in METADATA_CORPUS])
def test_edited_onnx_metadata_is_refused_in_one_line_naming_the_field(tiny, tmp_path, changes, needle):
    edited = _edited(tiny[1], tmp_path, **changes)
    with pytest.raises(UserError) as caught:
        load_predictor(edited)
    message = str(caught.value)
    assert needle in message and message.startswith(str(edited)) and "\n" not in message


def test_unedited_metadata_loads(tiny, tmp_path):
    predictor = load_predictor(_edited(tiny[1], tmp_path))
    assert predictor.classes == [str(i) for i in range(1, 7)] and predictor.backend == "onnx"
    assert predictor.preprocessing == Preprocessing.from_dict(GOOD_P)


def test_a_model_with_non_finite_outputs_is_refused_at_load(tiny, tmp_path, capsys):
    ckpt_path, onnx_path = tiny
    raw = torch.load(ckpt_path, weights_only=True)
    last = sorted(k for k in raw["head_state"] if k.endswith("bias"))[-1]
    raw["head_state"][last] = torch.full_like(raw["head_state"][last], float("nan"))
    torch.save(raw, tmp_path / "nan.pth")
    proto = onnx.load(str(onnx_path))
    bias = next(t for t in proto.graph.initializer if list(t.dims) == [6])  # the last layer's bias
    bias.CopyFrom(numpy_helper.from_array(np.full(6, np.inf, np.float32), bias.name))
    onnx.save(proto, str(tmp_path / "inf.onnx"))
    for broken in (tmp_path / "nan.pth", tmp_path / "inf.onnx"):
        with pytest.raises(UserError, match="finite"):
            load_predictor(broken)
        assert main(["serve", str(broken), "--port", str(free_port())]) == 2  # no server starts
        out, err = capsys.readouterr()
        assert "Serving" not in out and "finite" in err and err.count("\n") == 1


# ---------------------------------------------------------------- small models, default top_k

def test_a_three_category_model_predicts_with_the_default_top_k(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "three.pth", num_classes=3)
    onnx_path = export_onnx(ckpt, tmp_path / "three.onnx")
    rose = str(photo("rose.jpg"))
    for model in (ckpt, onnx_path):
        predictor = load_predictor(model)
        assert len(predictor.predict(rose).names) == 3  # "up to 5"
        assert len(predictor.predict(rose, top_k=2).names) == 2
        assert main(["predict", rose, str(model), "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["predictions"]) == 3
        assert main(["predict", rose, str(model), "--top_k", "4"]) == 2  # asked for: still an error
        assert "--top_k must be between 1 and the model's 3 categories (got 4)" in capsys.readouterr().err


# ---------------------------------------------------------------- the ONNX route without torch

NO_TORCH = '''
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "torchvision":
            raise ImportError(f"torch is blocked in this test (something imported {name})")

sys.meta_path.insert(0, NoTorch())
'''


@pytest.fixture
def torch_blocked(tmp_path):
    """An environment for a subprocess in which `import torch` fails (a sitecustomize on PYTHONPATH)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "torch is blocked" in probe.stderr  # the blocker works
    return env


def test_predict_an_onnx_model_with_torch_unimportable(tiny, torch_blocked):
    result = subprocess.run([sys.executable, "-m", "flower_classifier", "predict", str(photo("daisy.jpg")),
                             str(tiny[1]), "--json"], cwd=ROOT, env=torch_blocked, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["predictions"]) == 5


def test_serve_an_onnx_model_with_torch_unimportable(tiny, torch_blocked):
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flower_classifier", "serve", str(tiny[1]), "--port", str(port)],
                              cwd=ROOT, env=torch_blocked, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "Serving" in line, server.stderr.read() if server.poll() is not None else line
        for _ in range(100):
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/predict",
                                      files={"file": ("rose.jpg", photo("rose.jpg").read_bytes(), "image/jpeg")})
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not answer")
        assert response.status_code == 200 and len(response.json()["predictions"]) == 5
    finally:
        server.terminate()
        server.wait(timeout=30)
