"""Test-time augmentation (`tta=True`, `--tta`): one implementation (`predictor.average_views`) for
both backends, the evaluation, the command line and the API; the checkpoint's calibration reads the
averaged outputs, so PyTorch and ONNX still give the same probabilities and unknown answers."""
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from app_models import live_server, tiny_checkpoint
from conftest import make_dataset
from flower_classifier.calibration import Calibration, fit_feature_arrays
from flower_classifier.checkpoint import load_checkpoint, save_checkpoint
from flower_classifier.cli import main, single_command_main
from flower_classifier.evaluation import evaluate_checkpoint, report_checkpoint
from flower_classifier.export import export_onnx
from flower_classifier.predictor import load_predictor
from flower_classifier.serving import create_app

CLASSES = 6  # tiny_checkpoint's


def lopsided(path, seed: int, *, symmetric: bool = False):
    """A photo whose halves differ (its mirror image is another photo), or, `symmetric`, the same
    left-right (but not top-bottom): only a flip of the width axis leaves it unchanged."""
    rng = np.random.default_rng(seed)
    half = rng.integers(0, 256, size=(48, 24, 3)).astype(np.uint8)
    half[:, :12] = rng.integers(0, 256, size=3)  # a block of colour on one side
    other = half[:, ::-1] if symmetric else rng.integers(0, 256, size=(48, 24, 3)).astype(np.uint8) // 3
    Image.fromarray(np.concatenate([half, other], axis=1)).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny checkpoint, calibrated (temperature 2, a Mahalanobis unknown score with its threshold
    at the median of some photos' scores, so both answers occur), and its ONNX export."""
    tmp = tmp_path_factory.mktemp("tta")
    path = tiny_checkpoint(tmp / "tiny.pth")
    photos = [lopsided(tmp / f"fit{i}.png", 100 + i) for i in range(24)]
    torch_predictor = load_predictor(path)
    _, features = torch_predictor.outputs(np.stack([torch_predictor.prepare(p) for p in photos]))
    labels = np.arange(len(photos)) % CLASSES
    ckpt = load_checkpoint(path)
    ckpt.calibration = Calibration(2.0, "mahalanobis", arrays=fit_feature_arrays("mahalanobis", features, labels,
                                                                                  max_rank=4))
    ckpt.calibration.threshold = float(np.median(ckpt.calibration.scores(None, features)))
    save_checkpoint(ckpt, path)
    return {"pytorch": path, "onnx": export_onnx(path, tmp / "tiny.onnx")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tta_photos")
    return [lopsided(tmp / f"photo{i}.png", i) for i in range(8)]


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_tta_is_the_calibration_of_the_outputs_averaged_over_the_photo_and_its_mirror(models, photos, backend):
    predictor = load_predictor(models[backend])
    images = np.stack([predictor.prepare(p) for p in photos])  # (8, 3, S, S)
    plain_logits, plain_features = predictor.outputs(images)
    mirror_logits, mirror_features = predictor.outputs(np.ascontiguousarray(images[..., ::-1]))
    expected = predictor.calibration.assess((plain_logits + mirror_logits) / 2, (plain_features + mirror_features) / 2)
    answers = predictor.answer(images, top_k=CLASSES, tta=True)
    for answer, probabilities, score, unknown in zip(answers, expected.probabilities, expected.scores,
                                                     expected.unknown):
        order = [predictor.classes.index(c) for c in answer.categories]
        np.testing.assert_allclose(answer.probabilities, probabilities[order], rtol=1e-5, atol=1e-6)
        assert answer.score == pytest.approx(score, rel=1e-4) and answer.unknown == unknown
    plain = predictor.answer(images, top_k=CLASSES)
    assert any(abs(a.score - b.score) > 1e-3 for a, b in zip(answers, plain))  # the mirror image counts
    assert [a.rows() for a in answers] == [a.rows() for a in predictor.predict_batch(photos, CLASSES, tta=True)]


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_a_photo_and_its_mirror_image_get_the_same_tta_answer_and_a_symmetric_one_the_plain_answer(
        models, tmp_path, backend):
    predictor = load_predictor(models[backend])
    photo = lopsided(tmp_path / "photo.png", 7)
    mirror = tmp_path / "mirror.png"
    Image.open(photo).transpose(Image.FLIP_LEFT_RIGHT).save(mirror)
    one, other = predictor.predict(photo, CLASSES, tta=True), predictor.predict(mirror, CLASSES, tta=True)
    assert one.categories == other.categories and one.score == pytest.approx(other.score, rel=1e-4)
    np.testing.assert_allclose(one.probabilities, other.probabilities, rtol=1e-5, atol=1e-6)
    assert predictor.predict(photo, CLASSES).probabilities != pytest.approx(one.probabilities, rel=1e-4)
    # Left-right symmetric, top-bottom not: flipping the wrong axis would change its answer.
    symmetric = lopsided(tmp_path / "symmetric.png", 8, symmetric=True)
    np.testing.assert_allclose(predictor.predict(symmetric, CLASSES, tta=True).probabilities,
                               predictor.predict(symmetric, CLASSES).probabilities, rtol=1e-5, atol=1e-6)


def test_pytorch_and_onnx_give_the_same_tta_answer(models, photos):
    torch_answers = load_predictor(models["pytorch"]).predict_batch(photos, CLASSES, tta=True)
    onnx_answers = load_predictor(models["onnx"]).predict_batch(photos, CLASSES, tta=True)
    decisions = [a.unknown for a in torch_answers]
    assert decisions == [a.unknown for a in onnx_answers]
    assert [a.categories for a in torch_answers] == [a.categories for a in onnx_answers]
    for t, o in zip(torch_answers, onnx_answers):
        np.testing.assert_allclose(o.probabilities, t.probabilities, rtol=1e-4, atol=1e-5)
        assert o.score == pytest.approx(t.score, rel=1e-3)
    many = list(load_predictor(models["onnx"]).predict_many(photos, CLASSES, batch_size=3, tta=True))
    for result, one in zip(many, onnx_answers):
        np.testing.assert_allclose(result.prediction.probabilities, one.probabilities, rtol=1e-5, atol=1e-6)


def test_evaluation_with_tta_scores_what_prediction_answers(models, tmp_path):
    data = make_dataset(tmp_path / "flowers", [str(i) for i in range(1, CLASSES + 1)],
                        per_split={"test": 2}, size=(40, 48))
    paths = sorted((data / "test").glob("*/*.jpg"))
    predictor = load_predictor(models["pytorch"])
    predicted = [predictor.predict(p, 1, tta=True).categories[0] for p in paths]
    plain = [predictor.predict(p, 1).categories[0] for p in paths]
    expected = np.mean([guess == p.parent.name for guess, p in zip(predicted, paths)])
    metrics = evaluate_checkpoint(models["pytorch"], data / "test", progress=False, tta=True)
    assert metrics["count"] == len(paths) and metrics["accuracy"] == pytest.approx(expected)
    report = report_checkpoint(models["pytorch"], data / "test", tta=True)
    assert report.accuracy == pytest.approx(expected)
    # The report's predicted classes are the TTA ones, photo by photo.
    predicted_by_path = {str(p): g for p, g in zip(paths, predicted)}
    wrong = {m.path: predictor.classes[m.predicted] for m in report.mistakes}
    assert wrong == {p: g for p, g in predicted_by_path.items() if g != p.split("/")[-2]}
    if predicted != plain:  # on these photos TTA changes some answers: so must the plain evaluation
        assert evaluate_checkpoint(models["pytorch"], data / "test", progress=False)["accuracy"] == pytest.approx(
            np.mean([guess == p.parent.name for guess, p in zip(plain, paths)]))


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_predict_tta_on_the_command_line(models, photos, capsys, backend):
    argv = [str(photos[0]), str(models[backend]), "--top_k", "3", "--json"]
    assert single_command_main("predict", "predict.py", argv + ["--tta"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    expected = load_predictor(models[backend]).predict(photos[0], 3, tta=True)
    assert [r["category"] for r in rows] == expected.categories
    assert [r["probability"] for r in rows] == pytest.approx(expected.probabilities, rel=1e-5)
    assert main(["predict", *argv]) == 0  # without --tta: the plain answer
    assert [r["probability"] for r in json.loads(capsys.readouterr().out)["predictions"]] == pytest.approx(
        load_predictor(models[backend]).predict(photos[0], 3).probabilities, rel=1e-5)


def test_evaluate_and_report_take_tta(models, tmp_path, capsys):
    data = make_dataset(tmp_path / "flowers", [str(i) for i in range(1, CLASSES + 1)], per_split={"test": 1})
    expected = evaluate_checkpoint(models["pytorch"], data / "test", progress=False, tta=True)
    assert main(["evaluate", str(models["pytorch"]), str(data / "test"), "--tta", "--workers", "0"]) == 0
    assert f"top-1 accuracy: {100 * expected['accuracy']:.1f}%" in capsys.readouterr().out
    assert main(["report", str(models["pytorch"]), str(data / "test"), "--tta", "--workers", "0",
                 "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.txt").read_text().startswith(f"accuracy {100 * expected['accuracy']:.1f}%")


@pytest.mark.parametrize("server_default", [False, True])
def test_the_api_answers_with_tta_when_asked_or_by_the_servers_default(models, photos, server_default):
    predictor = load_predictor(models["onnx"])
    with_tta, without = predictor.predict(photos[0], 3, tta=True), predictor.predict(photos[0], 3)
    with live_server(create_app(predictor, tta=server_default)) as url:
        def ask(query=""):
            with open(photos[0], "rb") as f:
                response = httpx.post(f"{url}/predict?top_k=3{query}", files={"file": ("p.png", f, "image/png")})
            assert response.status_code == 200
            return response.json()

        for query, tta in (("", server_default), ("&tta=true", True), ("&tta=false", False)):
            body = ask(query)
            assert body["tta"] is tta
            expected = with_tta if tta else without
            assert [r["probability"] for r in body["predictions"]] == pytest.approx(expected.probabilities, rel=1e-5)
            assert body["score"] == pytest.approx(expected.score, rel=1e-5)
        with open(photos[0], "rb") as f:
            batch = httpx.post(f"{url}/predict/batch?top_k=3&tta=true", files=[("files", ("p.png", f, "image/png"))])
        assert batch.json()["tta"] is True
        assert [r["probability"] for r in batch.json()["results"][0]["predictions"]] == pytest.approx(
            with_tta.probabilities, rel=1e-5)
        assert httpx.post(f"{url}/predict?tta=maybe", files={"file": ("p.png", b"x", "image/png")}).status_code == 422


@pytest.fixture(scope="module")
def handed_models(tmp_path_factory):
    """A tiny checkpoint (and its ONNX export) whose linear head tells a photo from its mirror image
    by far: logits (6, 0) for the photo, (0, 2) for its mirror. The mean of the logits, (3, 1), and
    the mean of the probabilities then give clearly different answers (0.88 against 0.56)."""
    import torch

    from flower_classifier.backbones import build_backbone
    from flower_classifier.checkpoint import Checkpoint
    from flower_classifier.config import TrainConfig

    tmp = tmp_path_factory.mktemp("tta_handed")
    photo = lopsided(tmp / "photo.png", 7)
    backbone = build_backbone("tiny")
    config = TrainConfig(arch="tiny", hidden_units=(2,), dropout=0.0)
    eye, zero = torch.eye(2), torch.zeros(2)
    head = {"0.weight": torch.zeros(2, backbone.feature_dim), "0.bias": zero, "3.weight": eye, "3.bias": zero}
    path = save_checkpoint(Checkpoint("tiny", backbone.preprocessing, head, ["1", "2"], config), tmp / "handed.pth")
    predictor = load_predictor(path)
    image = predictor.prepare(photo)[None]  # (1, 3, S, S)
    _, (f,) = predictor.outputs(image)
    _, (g,) = predictor.outputs(np.ascontiguousarray(image[..., ::-1]))
    d = torch.from_numpy(f - g).double()
    unit = d / d.dot(d)  # x . unit: 1 more for the photo than for its mirror
    f, g = torch.from_numpy(f).double(), torch.from_numpy(g).double()
    # hidden = (6 (x - g) . unit, 2 (f - x) . unit) + 1 (positive: ReLU passes it), logits = hidden - 1
    head = {"0.weight": torch.stack([6 * unit, -2 * unit]).float(),
            "0.bias": (torch.stack([-6 * g.dot(unit), 2 * f.dot(unit)]) + 1).float(), "3.weight": eye,
            "3.bias": -torch.ones(2)}
    save_checkpoint(Checkpoint("tiny", backbone.preprocessing, head, ["1", "2"], config), path)
    return {"pytorch": path, "onnx": export_onnx(path, tmp / "handed.onnx")}, photo


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_tta_averages_logits_not_probabilities(handed_models, backend):
    models, photo = handed_models
    predictor = load_predictor(models[backend])
    image = predictor.prepare(photo)[None]
    (plain,), _ = predictor.outputs(image)
    (mirror,), _ = predictor.outputs(np.ascontiguousarray(image[..., ::-1]))
    np.testing.assert_allclose([plain, mirror], [[6, 0], [0, 2]], atol=0.05)  # the views differ by far
    softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # noqa: E731
    of_logits, of_probabilities = softmax((plain + mirror) / 2)[0], (softmax(plain) + softmax(mirror))[0] / 2
    assert of_logits - of_probabilities > 0.3  # 0.88 against 0.56
    (probabilities,) = predictor.probabilities(image, tta=True)
    assert probabilities[0] == pytest.approx(of_logits, abs=0.01)
    (answer,) = predictor.answer(image, top_k=2, tta=True)
    assert answer.probabilities[0] == pytest.approx(of_logits, abs=0.01)
