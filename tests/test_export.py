"""Export to ONNX: one self-contained file, the same top-5 as PyTorch on real photos, and
predict.py on an .onnx model without torch."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from app_models import PHOTO_CATEGORY, finetuned_checkpoint, lite0_checkpoint, photo, tiny_checkpoint
from conftest import ROOT, make_image
from flower_classifier.backbones import build_backbone
from flower_classifier.images import Preprocessing
from flower_classifier.checkpoint import load_model
from flower_classifier.cli import main
from flower_classifier.export import export_onnx
from flower_classifier.data import eval_transform
from flower_classifier.images import decode_image, preprocess
from flower_classifier.predictor import OnnxPredictor, load_predictor, predict


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lite0")
    ckpt = lite0_checkpoint(tmp / "lite0.pth")
    return ckpt, export_onnx(ckpt, tmp / "lite0.onnx")


@pytest.fixture(scope="module")
def lite0_models(lite0):
    """The PyTorch model and the ONNX Runtime session, loaded once."""
    ckpt_path, onnx_path = lite0
    return load_model(ckpt_path)[0], load_predictor(onnx_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    ckpt = tiny_checkpoint(tmp / "tiny.pth")
    (tmp / "out").mkdir()  # export writes into a folder that exists, never makes one
    return ckpt, export_onnx(ckpt, tmp / "out" / "tiny.onnx")


PREPROCESSINGS = [
    Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # efficientnet_lite0
    Preprocessing(224, 256),  # torchvision ImageNet, bilinear
    Preprocessing(32, 36, interpolation="nearest"),
    Preprocessing(40, 32),  # resize smaller than the crop: torchvision pads
]


@pytest.mark.parametrize("p", PREPROCESSINGS, ids=lambda p: f"{p.input_size}-{p.resize_size}-{p.interpolation}")
@pytest.mark.parametrize("size", [(301, 177), (177, 300), (224, 224), (37, 23)])
def test_numpy_preprocessing_equals_the_torchvision_transform(tmp_path, p, size):
    """Odd sizes in both orientations check the resize rounding and the centre crop's offsets."""
    image = Image.open(make_image(tmp_path / "x.png", (120, 200, 60), size=size, seed=size[0])).convert("RGB")
    expected = eval_transform(p)(image).numpy()  # torchvision: Resize, CenterCrop, ToTensor, Normalize
    got = preprocess(image, p)
    assert got.shape == expected.shape == (3, p.input_size, p.input_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_numpy_preprocessing_on_a_real_photo():
    p = PREPROCESSINGS[0]
    image = decode_image(photo("rose.jpg"))
    np.testing.assert_allclose(preprocess(image, p), eval_transform(p)(image).numpy(), rtol=0, atol=1e-5)


def test_export_writes_one_file_with_classes_names_and_preprocessing(tiny):
    ckpt_path, onnx_path = tiny
    assert [p.name for p in onnx_path.parent.iterdir()] == ["tiny.onnx"]  # no external weights, no temp file
    proto = onnx.load(str(onnx_path))
    meta = {m.key: m.value for m in proto.metadata_props}
    _, ckpt = load_model(ckpt_path)
    assert meta["format"] == "flower_classifier.onnx" and meta["arch"] == "tiny"
    assert json.loads(meta["classes"]) == ckpt.classes
    assert json.loads(meta["cat_to_name"]) == ckpt.cat_to_name
    assert json.loads(meta["preprocessing"]) == ckpt.preprocessing.to_dict()
    assert [o.name for o in proto.graph.output] == ["logits", "features"]


def test_onnx_model_takes_a_batch_and_outputs_probabilities(tiny):
    _, onnx_path = tiny
    model = OnnxPredictor(onnx_path)
    images = np.stack([preprocess(decode_image(photo(n)), model.preprocessing) for n in PHOTO_CATEGORY])
    probs = model.probabilities(images)  # (3, 6)
    assert probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(model.probabilities(images[1:2])[0], probs[1], atol=1e-6)


@pytest.mark.parametrize("name", sorted(PHOTO_CATEGORY))
def test_onnx_top5_matches_pytorch_on_real_photos(lite0_models, name):
    """The whole path: PyTorch (torchvision transform + model) vs ONNX Runtime (numpy preprocessing)."""
    model, session = lite0_models
    expected = predict(photo(name), model, top_k=5)
    got = session.predict(photo(name), top_k=5)
    assert got.categories == expected.categories and got.names == expected.names
    assert got.categories[0] == PHOTO_CATEGORY[name]
    np.testing.assert_allclose(got.probabilities, expected.probabilities, rtol=0, atol=1e-4)


def test_predict_py_runs_an_onnx_model_without_importing_torch(tiny):
    """predict.py as a user runs it, in a fresh interpreter that reports whether torch got imported."""
    _, onnx_path = tiny
    probe = ("import runpy, sys\n"
             f"sys.argv = ['predict.py', {str(photo('daisy.jpg'))!r}, {str(onnx_path)!r}, '--json']\n"
             "try:\n    runpy.run_path('predict.py', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('EXIT', code, 'TORCH', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("EXIT 0 TORCH False"), result.stdout + result.stderr
    rows = json.loads(result.stdout[:result.stdout.rindex("EXIT")])["predictions"]
    assert len(rows) == 5 and all(r["name"].startswith("flower ") for r in rows)


def test_export_command_and_its_mistakes(tmp_path, capsys, tiny):
    ckpt_path, _ = tiny
    assert main(["export", str(ckpt_path), str(tmp_path / "m.onnx")]) == 0
    assert "Wrote" in capsys.readouterr().out and (tmp_path / "m.onnx").is_file()
    assert main(["export", str(tmp_path / "missing.pth"), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.pth" in err and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


def test_predict_refuses_an_onnx_file_that_is_not_ours(tmp_path, capsys, tiny):
    fake = tmp_path / "fake.onnx"
    fake.write_text("not a model")
    assert main(["predict", str(photo("daisy.jpg")), str(fake)]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    foreign = onnx.load(str(tiny[1]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    assert main(["predict", str(photo("daisy.jpg")), str(tmp_path / "foreign.onnx")]) == 2
    assert "not one exported by this project" in capsys.readouterr().err


def test_decode_image_reads_like_the_training_loader(tmp_path):
    """images.decode_image (torch-free) and data.load_image must give the same pixels: EXIF
    rotation, transparency, 16-bit and palette images."""
    from flower_classifier.data import load_image

    rng = np.random.default_rng(0)
    rotated = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)).save(tmp_path / "deep.png")
    rotated.convert("P").save(tmp_path / "palette.gif")
    for name in ("rotated.jpg", "alpha.png", "deep.png", "palette.gif"):
        ours, theirs = decode_image(tmp_path / name), load_image(tmp_path / name)
        assert ours.mode == "RGB" and ours.size == theirs.size, name
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name
    assert decode_image(tmp_path / "rotated.jpg").size == (20, 30)


@pytest.mark.parametrize("arch, n", [("tiny", 1), ("efficientnet_lite0", 2)])
def test_a_finetuned_checkpoint_exports_its_blocks_and_matches_pytorch(arch, n, tmp_path):
    ckpt = finetuned_checkpoint(tmp_path / f"{arch}.pth", arch, n)
    onnx_path = export_onnx(ckpt, tmp_path / f"{arch}.onnx")
    pytorch, session = load_predictor(ckpt), load_predictor(onnx_path)
    assert isinstance(session, OnnxPredictor) and not isinstance(pytorch, OnnxPredictor)
    images = np.stack([pytorch.prepare(photo(name)) for name in sorted(PHOTO_CATEGORY)])
    expected_logits, expected_features = pytorch.outputs(images)
    logits, feats = session.outputs(images)
    np.testing.assert_allclose(feats, expected_features, rtol=0, atol=1e-4 * max(1.0, np.abs(expected_features).max()))
    np.testing.assert_allclose(session.probabilities(images), pytorch.probabilities(images), rtol=0, atol=1e-4)
    # The file carries the fine-tuned blocks: the pretrained backbone gives other features.
    with torch.inference_mode():
        pretrained = build_backbone(arch).module(torch.from_numpy(images)).numpy()
    assert np.abs(pretrained - feats).max() > 1e-2 * np.abs(feats).max()
