"""Issue 13 end to end: calibration fitted after training and by `calibrate`, stored and validated in
the checkpoint and the ONNX file, the same unknown decisions from PyTorch and ONNX Runtime, and what
predict.py, --json, the API, evaluate and the report show."""
import io
from pathlib import Path
import json
import warnings

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from app_models import PHOTO_CATEGORY, lite0_checkpoint, live_server, photo, tiny_checkpoint
from conftest import make_dataset, make_image
from flower_classifier.backbones import build_backbone
from flower_classifier.calibrating import cross_fitted_logits
from flower_classifier.calibration import Calibration
from flower_classifier.unknown import fit_feature_arrays, stratified_folds
from flower_classifier.checkpoint import load_checkpoint, save_checkpoint
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig
from flower_classifier.errors import UserError
from flower_classifier.export import export_onnx
from flower_classifier.predictor import ONNX_FORMAT, load_predictor, process_image
from flower_classifier.serving import create_app
from flower_classifier.training import run_training

CLASSES = ["a", "b", "c", "d"]


def make_negatives(folder, count=6):
    """Photos that are none of the species: stripes and checkerboards, unlike the flat-colour classes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.zeros((40, 48, 3), dtype=np.uint8)
        pixels[:, ::2 + i % 3] = (255, 255 - 40 * i, 40 * i)
        pixels[::3] = 255 - pixels[::3]
        Image.fromarray(pixels).save(folder / f"odd_{i}.png")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unknown")
    data = make_dataset(tmp / "flowers", CLASSES, per_split={"train": 5, "valid": 4, "test": 3})
    negatives = make_negatives(tmp / "negatives")
    config = TrainConfig(arch="tiny", hidden_units=(16,), epochs=3, num_workers=0, learning_rate=0.01)
    lines = []
    result = run_training(config, data, save_dir=tmp / "ck", negatives=negatives, progress=False, log=lines.append)
    return data, negatives, result, lines


def _with_calibration(src, dst, **fields):
    ckpt = load_checkpoint(src)
    ckpt.calibration = Calibration(**{"temperature": 1.0, "method": "msp", "threshold": 0.5, **fields})
    return save_checkpoint(ckpt, dst)


def test_training_calibrates_the_best_checkpoint_once_and_says_what_it_chose(run):
    data, negatives, result, lines = run
    said = [line for line in lines if line.startswith("Calibrated on")]
    assert len(said) == 1 and f"36 train+valid photos (cross-fitted in 5 folds) and 6 photos of {negatives}" in said[0]
    assert "unknown when the near_far score is above" in said[0] and "negatives" in said[0]
    calibration = load_checkpoint(result.best_path).calibration
    assert calibration is not None and calibration.method == "near_far"  # the default
    assert calibration.arrays["means"].shape == (len(CLASSES), 16)  # the tiny backbone's 16 features
    assert load_checkpoint(result.last_path).calibration is None  # what --resume continues: never loaded to predict
    assert torch.load(result.best_path, weights_only=True)["calibration"]["version"] == 1  # plain data


def test_calibration_cross_fits_photos_not_their_augmented_copies(tmp_path):
    # A copy of a held-out photo in the other folds would make its score look too good.
    data = make_dataset(tmp_path / "flowers", CLASSES, per_split={"train": 5, "valid": 4})
    config = TrainConfig(arch="tiny", hidden_units=(16,), epochs=1, num_workers=0, augmented_views=2)
    lines = []
    run_training(config, data, save_dir=tmp_path / "ck", cache_dir=tmp_path / "cache", progress=False,
                 log=lines.append)
    training = next(line for line in lines if line.startswith("Training"))
    assert "60 training" in training  # 20 photos x (centre crop + 2 views) trained the head...
    said = next(line for line in lines if line.startswith("Calibrated on"))
    assert "36 train+valid photos" in said  # ...but calibration saw each of the 20 + 16 photos once


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(threshold=float("nan")), "calibration field 'threshold' must be a finite number"),
    (lambda c: c.update(method="guess"), "calibration field 'method' must be one of"),
    (lambda c: c["arrays"].pop("basis"), "calibration field 'arrays' must hold exactly"),
    (lambda c: c["arrays"]["means"].update(shape=[5, 16]), "calibration field 'arrays.means' is damaged"),
])
def test_an_edited_calibration_is_refused_in_one_line(run, tmp_path, edit, needle):
    raw = torch.load(run[2].best_path, weights_only=True)
    edit(raw["calibration"])
    torch.save(raw, tmp_path / "edited.pth")
    with pytest.raises(UserError) as caught:
        load_checkpoint(tmp_path / "edited.pth")
    assert str(caught.value).startswith(str(tmp_path / "edited.pth")) and needle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_calibration_for_another_model_is_refused(run, tmp_path):
    """Arrays of the right form but another class count: from a different checkpoint, pasted in."""
    raw = torch.load(run[2].best_path, weights_only=True)
    other = Calibration(1.0, "cosine", 0.5, arrays={"directions": np.ones((len(CLASSES) + 1, 16), np.float32)})
    raw["calibration"] = other.to_dict()
    torch.save(raw, tmp_path / "other.pth")
    with pytest.raises(UserError, match="disagrees with C = 4"):
        load_checkpoint(tmp_path / "other.pth")


def test_predict_prints_the_unknown_line_and_json_fields_and_no_unknown_turns_it_off(run, tmp_path, capsys):
    best = run[2].best_path
    everything = _with_calibration(best, tmp_path / "all.pth", threshold=-1.0)  # every msp score is above -1
    nothing = _with_calibration(best, tmp_path / "none.pth", threshold=2.0)
    flower = make_image(tmp_path / "p.png", (200, 60, 60))
    assert main(["predict", str(flower), str(everything)]) == 0
    out = capsys.readouterr().out
    # The answer first; the nearest species after it, labelled as no answer.
    assert out.splitlines()[0].startswith(f"{flower}: unknown: not one of the 4 species this model knows (score 0.")
    assert "above its threshold -1" in out.splitlines()[0] and "the photo is none of them" in out.splitlines()[1]
    assert out.count("%") == 4  # the top-K rows are still shown
    assert main(["predict", str(flower), str(everything), "--no_unknown"]) == 0
    assert "not one of" not in capsys.readouterr().out
    for path, unknown in ((everything, True), (nothing, False)):
        assert main(["predict", str(flower), str(path), "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["unknown"] is unknown and 0 < answer["score"] < 1 and len(answer["predictions"]) == 4
        assert abs(sum(p["probability"] for p in answer["predictions"]) - 1) < 1e-6
    assert main(["predict", str(flower), str(everything), "--json", "--no_unknown"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown"] is None


def test_probabilities_shown_are_the_calibrated_ones(run, tmp_path):
    flower = make_image(tmp_path / "p.png", (200, 60, 60))
    plain = load_predictor(_with_calibration(run[2].best_path, tmp_path / "t1.pth", temperature=1.0))
    hot = load_predictor(_with_calibration(run[2].best_path, tmp_path / "t3.pth", temperature=3.0))
    p1, p3 = plain.predict(flower), hot.predict(flower)
    assert p1.categories[0] == p3.categories[0] and p3.probabilities[0] < p1.probabilities[0]


def test_an_old_checkpoint_without_calibration_still_predicts_and_says_how_to_add_it(tmp_path, capsys):
    old = tiny_checkpoint(tmp_path / "old.pth")
    assert load_checkpoint(old).calibration is None
    flower = make_image(tmp_path / "p.png", (200, 60, 60))
    assert main(["predict", str(flower), str(old), "--json"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["unknown"] is None and answer["score"] is None
    assert captured.err.count("flower_classifier calibrate") == 1 and "no calibration" in captured.err
    onnx_path = export_onnx(old, tmp_path / "old.onnx")
    assert load_predictor(onnx_path).calibration is None


def test_a_version_1_onnx_file_still_loads_without_calibration(tmp_path):
    """Files exported before calibration: probabilities out, format_version 1."""
    from flower_classifier.checkpoint import load_model

    model, ckpt = load_model(tiny_checkpoint(tmp_path / "t.pth"))
    buffer = io.BytesIO()
    softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(softmax, (torch.zeros(1, 3, 32, 32),), buffer, dynamo=False, input_names=["image"],
                          output_names=["probabilities"], dynamic_axes={"image": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {"format": ONNX_FORMAT, "format_version": "1", "arch": "tiny",
                       "classes": json.dumps(ckpt.classes), "cat_to_name": json.dumps(ckpt.cat_to_name),
                       "preprocessing": json.dumps(ckpt.preprocessing.to_dict())}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "v1.onnx"))
    flower = make_image(tmp_path / "p.png", (200, 60, 60))
    old, new = load_predictor(tmp_path / "v1.onnx").predict(flower), load_predictor(tmp_path / "t.pth").predict(flower)
    assert old.unknown is None and old.categories == new.categories
    np.testing.assert_allclose(old.probabilities, new.probabilities, atol=1e-5)


def test_the_api_carries_unknown_and_score_and_honours_no_unknown(run, tmp_path):
    model = export_onnx(_with_calibration(run[2].best_path, tmp_path / "all.pth", threshold=-1.0),
                        tmp_path / "all.onnx")
    flower = (make_image(tmp_path / "p.jpg", (200, 60, 60))).read_bytes()
    with live_server(create_app(load_predictor(model))) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = http.post("/predict", files={"file": ("p.jpg", flower, "image/jpeg")}).json()
        assert body["unknown"] is True and 0 < body["score"] < 1 and body["species"] == 4
        off = http.post("/predict", files={"file": ("p.jpg", flower, "image/jpeg")}, params={"no_unknown": "true"})
        assert off.json()["unknown"] is None and off.json()["predictions"] == body["predictions"]


def test_evaluate_and_report_print_and_draw_the_calibration_and_unknown_figures(run, tmp_path, capsys):
    data, negatives, result, _ = run
    assert main(["evaluate", str(result.best_path), str(data / "test"), "--negatives", str(negatives),
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "calibration error (ECE, 15 bins):" in out and "after temperature scaling" in out
    assert "AUROC species vs not-species" in out and "not-species caught" in out and "of 6" in out
    assert "species wrongly called unknown" in out and "accuracy on accepted species" in out
    report_dir = tmp_path / "report"
    assert main(["report", str(result.best_path), str(data / "test"), "--negatives", str(negatives),
                 "--workers", "0", "--out", str(report_dir)]) == 0
    for name in ("calibration.png", "unknown_scores.png"):
        assert Image.open(report_dir / name).size[0] > 300
    assert "AUROC" in (report_dir / "report.txt").read_text()
    assert main(["report", str(result.best_path), str(data / "test"), "--workers", "0", "--out",
                 str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "calibration.png").is_file() and not (tmp_path / "plain" / "unknown_scores.png").exists()


def test_calibrate_rewrites_a_checkpoint_and_refuses_bad_input_leaving_it_whole(run, tmp_path, capsys):
    data, negatives, result, _ = run
    target = tmp_path / "old.pth"
    ckpt = load_checkpoint(result.best_path)
    ckpt.calibration = None
    save_checkpoint(ckpt, target)
    assert main(["calibrate", str(target), str(data), "--unknown_score", "cosine", "--keep", "0.9",
                 "--negatives", str(negatives), "--quiet", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "unknown when the cosine score is above" in out and "6 photos of" in out
    calibrated = load_checkpoint(target).calibration
    assert calibrated.method == "cosine" and [p.name for p in tmp_path.iterdir()] == ["old.pth"]  # no temp file left
    before = target.read_bytes()
    wrong = make_dataset(tmp_path / "wrong", ["x", "y"], per_split={"train": 1, "valid": 1})
    for args, needle in (([str(wrong)], "are not those of"), ([str(data), "--negatives", str(tmp_path / "no")],
                                                              "no such directory"),
                         ([str(data / "test")], "train"),
                         ([str(data), "--negatives", str(data / "train" / "a")], "own training or validation photos")):
        assert main(["calibrate", str(target), *args, "--quiet", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert target.read_bytes() == before


def test_calibrate_refuses_an_unwritable_checkpoint_folder_before_any_work(run, tmp_path, capsys, monkeypatch):
    import os

    from flower_classifier import calibrating

    data, _, result, _ = run
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != result.best_path.parent and real(path, mode))
    monkeypatch.setattr(calibrating, "calibration_data", lambda *a, **k: pytest.fail("worked before checking"))
    assert main(["calibrate", str(result.best_path), str(data), "--quiet", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and err.count("\n") == 1


# ---------------------------------------------------------------- the same answer from both backends

def _generated_photos(tmp_path):
    """Not-flowers: noise, stripes, flat colours, a gradient; unlike the three real flower photos."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (180, 240, 3), dtype=np.uint8) for _ in range(2)]
    stripes = np.zeros((200, 200, 3), np.uint8)
    stripes[:, ::8] = 255
    arrays += [stripes, np.full((160, 160, 3), (20, 40, 200), np.uint8),
               np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (200, 1, 3))]
    paths = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"thing_{i}.png")
        paths.append(tmp_path / f"thing_{i}.png")
    return paths


def test_pytorch_and_onnx_give_the_same_unknown_decisions_on_real_and_generated_photos(tmp_path):
    """The real backbone: features from real flower photos (their flips and crops as the "species"),
    a Mahalanobis calibration, then both backends on the real photos and on generated non-flowers."""
    ckpt_path = lite0_checkpoint(tmp_path / "lite0.pth")
    ckpt = load_checkpoint(ckpt_path)
    backbone = build_backbone("efficientnet_lite0")
    views, labels = [], []
    for name, category in PHOTO_CATEGORY.items():
        image = Image.open(photo(name)).convert("RGB")
        w, h = image.size
        for crop in (image, image.transpose(Image.FLIP_LEFT_RIGHT), image.crop((0, 0, w * 3 // 4, h * 3 // 4)),
                     image.crop((w // 4, h // 4, w, h))):
            views.append(process_image(crop, ckpt.preprocessing))
            labels.append(ckpt.classes.index(category))
    with torch.no_grad():
        features = backbone.module(torch.stack(views)).numpy()
    # Three photos, five classes: fit on the three, then let the two photo-less classes share a mean.
    seen = sorted(set(labels))
    arrays = fit_feature_arrays("mahalanobis", features, np.array([seen.index(y) for y in labels]), max_rank=4)
    arrays["means"] = arrays["means"][[seen.index(c) if c in seen else 0 for c in range(len(ckpt.classes))]]
    ckpt.calibration = Calibration(1.0, "mahalanobis", arrays=arrays)
    # Half as far again as the farthest flower view: no photo sits on the edge, where rounding could decide.
    ckpt.calibration.threshold = 1.5 * float(ckpt.calibration.scores(None, features).max())
    save_checkpoint(ckpt, ckpt_path)
    onnx_path = export_onnx(ckpt_path, tmp_path / "lite0.onnx")
    photos = [photo(n) for n in PHOTO_CATEGORY] + _generated_photos(tmp_path)
    torch_answers = load_predictor(ckpt_path).predict_batch(photos)
    onnx_answers = load_predictor(onnx_path).predict_batch(photos)
    decisions = [a.unknown for a in torch_answers]
    assert decisions == [a.unknown for a in onnx_answers]
    assert decisions[:3] == [False] * 3 and sum(decisions[3:]) >= 3  # both kinds occur: the check can fail
    np.testing.assert_allclose([a.score for a in onnx_answers], [a.score for a in torch_answers], rtol=1e-3)


def test_cross_fitted_logits_come_from_heads_that_never_saw_the_photo():
    """Three mislabelled photos among three clusters: a head that saw them learns their wrong labels,
    the cross-fitted logits (a head per fold, trained on the other folds) name their true cluster."""
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(3), 20)
    x = ((rng.normal(size=(3, 8)) * 3)[true] + rng.normal(size=(60, 8))).astype(np.float32)
    labels, flipped = true.copy(), np.array([0, 25, 50])
    labels[flipped] = (true[flipped] + 1) % 3
    config = TrainConfig(arch="tiny", hidden_units=(64,), learning_rate=0.01, batch_size=16, num_workers=0)
    state = torch.get_rng_state()
    crossed = cross_fitted_logits(config, 60, x, labels, 3, stratified_folds(labels))
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is left alone
    np.testing.assert_array_equal(crossed[flipped].argmax(1), true[flipped])
    assert (crossed.argmax(1) == true).mean() >= 0.95  # 60 epochs on 3 wrong labels: a neighbour may follow one
    # The same heads, each scoring a copy of the photos it trained on: the wrong labels, learnt.
    seen = cross_fitted_logits(config, 60, np.concatenate([x, x]), np.concatenate([labels, labels]), 3,
                               np.repeat([0, 1], 60))[:60]
    np.testing.assert_array_equal(seen[flipped].argmax(1), labels[flipped])
    np.testing.assert_array_equal(cross_fitted_logits(config, 60, x, labels, 3, stratified_folds(labels)), crossed)


@pytest.mark.parametrize("method, train", [("near_far", 5), ("mahalanobis_species", 3)])
def test_a_score_is_fitted_by_training_stored_in_checkpoint_and_onnx_and_answers_alike(tmp_path, method, train):
    """--unknown_score near_far or mahalanobis_species end to end: fitted after training (with negatives;
    per species from 3 training photos each), validated on load from the checkpoint and from ONNX
    metadata, the same scores and kinds from both backends."""
    data = make_dataset(tmp_path / "flowers", CLASSES, per_split={"train": train, "valid": 4, "test": 1})
    config = TrainConfig(arch="tiny", hidden_units=(16,), epochs=2, num_workers=0, learning_rate=0.01,
                         unknown_score=method)
    lines = []
    result = run_training(config, data, save_dir=tmp_path / "ck", negatives=make_negatives(tmp_path / "neg"),
                          progress=False, log=lines.append)
    assert any(f"unknown when the {method} score is above" in line for line in lines)
    calibration = load_checkpoint(result.best_path).calibration
    assert calibration.method == method and calibration.kept >= 0.95
    assert f"refuses {1 - calibration.kept:.0%} of photos of its own species" in calibration.refusal()
    onnx_path = export_onnx(result.best_path, tmp_path / "m.onnx")
    from_onnx = load_predictor(onnx_path).calibration
    assert from_onnx.to_dict() == calibration.to_dict()
    photos = sorted((data / "test").rglob("*.png")) + sorted((tmp_path / "neg").glob("*.png"))
    torch_answers = load_predictor(result.best_path).predict_batch(photos)
    onnx_answers = load_predictor(onnx_path).predict_batch(photos)
    assert [a.unknown for a in torch_answers] == [a.unknown for a in onnx_answers]
    np.testing.assert_allclose([a.score for a in onnx_answers], [a.score for a in torch_answers], rtol=1e-3, atol=1e-3)
