"""Many photos at once: predict.py with several photos, a folder or a glob (text, JSON lines, CSV),
unreadable ones named and skipped; `Predictor.predict_many`; the API's POST /predict/batch."""
import csv
import json
import shutil

import httpx
import pytest

from app_models import live_server, photo, tiny_models
from flower_classifier.cli import single_command_main
from flower_classifier.predictor import load_predictor
from flower_classifier.serving import MAX_BATCH_FILES, create_app

NAMES = ("daisy.jpg", "rose.jpg", "sunflower.jpg")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("many"))


@pytest.fixture
def album(tmp_path):
    """album/{daisy,rose}.jpg, album/more/sunflower.jpg, a text file, a broken photo and a hidden file."""
    root = tmp_path / "album"
    (root / "more").mkdir(parents=True)
    shutil.copy(photo("daisy.jpg"), root / "daisy.jpg")
    shutil.copy(photo("rose.jpg"), root / "rose.jpg")
    shutil.copy(photo("sunflower.jpg"), root / "more" / "sunflower.jpg")
    (root / "notes.txt").write_text("not a photo")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / ".hidden.jpg").write_bytes(b"junk")
    return root


def predict(*argv):
    return single_command_main("predict", "predict.py", [str(a) for a in argv])


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_predict_many_matches_one_at_a_time_and_names_the_unreadable(models, album, backend):
    predictor = load_predictor(models[backend])
    photos = [album / "daisy.jpg", album / "broken.jpg", album / "missing.jpg", album / "rose.jpg",
              album / "more" / "sunflower.jpg"]
    results = list(predictor.predict_many(photos, top_k=3, batch_size=2))
    assert [r.photo for r in results] == [str(p) for p in photos]  # in order, one per photo
    assert [r.error is None for r in results] == [True, False, False, True, True]
    assert "broken.jpg" in results[1].error and "no such file" in results[2].error
    for result in results:
        if result.error is None:
            one = predictor.predict(result.photo, 3)
            assert result.prediction.categories == one.categories
            assert result.prediction.probabilities == pytest.approx(one.probabilities, abs=1e-6)


def test_a_folder_and_a_glob_give_a_result_per_photo(models, album, capsys):
    assert predict(album, models["onnx"], "--top_k", "2") == 0
    out, err = capsys.readouterr()
    assert out.count("Top 2 for ") == 3  # daisy, rose, more/sunflower: the folder's photos by extension
    assert f"Top 2 for {album / 'more' / 'sunflower.jpg'}:" in out
    assert "warning: skipping" in err and "broken.jpg" in err and "notes.txt" not in err and "hidden" not in err
    assert "1 of 4 photos skipped" in err

    assert predict(str(album / "*.jpg"), models["onnx"]) == 0  # quoted: predict expands it
    out, _ = capsys.readouterr()
    assert out.count("Top 5 for ") == 2 and "sunflower" not in out


def test_json_lines_and_csv(models, album, tmp_path, capsys):
    table = tmp_path / "predictions.csv"
    photos = [album / "daisy.jpg", album / "notes.txt", album / "rose.jpg"]
    assert predict(*photos, models["pytorch"], "--top_k", "3", "--json", "--csv", table) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in photos]
    assert len(lines[0]["predictions"]) == 3 and set(lines[0]["predictions"][0]) == {"name", "category", "probability"}
    assert "notes.txt" in lines[1]["error"] and "predictions" not in lines[1]
    assert f"wrote {table} (3 rows)" in err.lower()
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "unknown", "score", "name_1", "category_1", "probability_1", "name_2",
                             "category_2", "probability_2", "name_3", "category_3", "probability_3", "error"]
    assert [r["path"] for r in rows] == [str(p) for p in photos]
    # No calibration in this model: not asked, so empty cells, as the JSON's nulls.
    assert (rows[0]["unknown"], rows[0]["score"]) == ("", "") and lines[0]["unknown"] is None
    first = lines[0]["predictions"]
    assert [rows[0]["name_1"], rows[0]["category_1"]] == [first[0]["name"], first[0]["category"]]
    assert float(rows[0]["probability_2"]) == pytest.approx(first[1]["probability"])
    assert rows[1]["name_1"] == "" and "not a readable image" in rows[1]["error"]


def test_one_photo_keeps_its_json_array_and_its_one_line_error(models, album, capsys):
    assert predict(album / "daisy.jpg", models["onnx"], "--json", "--top_k", "2") == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]  # an object: it also carries unknown and score
    assert isinstance(rows, list) and len(rows) == 2 and set(rows[0]) == {"name", "category", "probability"}
    assert predict(album / "broken.jpg", models["onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "broken.jpg" in err


def test_nothing_readable_is_exit_2(models, album, tmp_path, capsys):
    assert predict(album / "broken.jpg", album / "notes.txt", models["onnx"]) == 2
    err = capsys.readouterr().err
    assert "error: none of the 2 photos could be read" in err and "broken.jpg" in err
    assert predict(str(tmp_path / "nowhere" / "*.jpg"), tmp_path / "empty", models["onnx"]) == 2
    err = capsys.readouterr().err
    assert "no file matches" in err and "error:" in err


def test_a_table_that_cannot_be_written_is_one_line(models, album, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert predict(album / "daisy.jpg", album / "rose.jpg", models["onnx"], "--csv", tmp_path / "file" / "x.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --csv") and "x.csv" in err[0]


# ---------------------------------------------------------------- the API

def test_the_batch_endpoint_answers_per_photo(models):
    files = [("files", (name, photo(name).read_bytes(), "image/jpeg")) for name in NAMES]
    files.insert(1, ("files", ("notes.txt", b"not a photo", "text/plain")))
    files.append(("files", ("empty.jpg", b"", "image/jpeg")))
    predictor = load_predictor(models["onnx"])
    with live_server(create_app(predictor, max_upload_mb=0.5)) as url, httpx.Client(base_url=url, timeout=60) as http:
        response = http.post("/predict/batch", files=files, params={"top_k": 2})
        assert response.status_code == 200
        results = response.json()["results"]
        assert [r["filename"] for r in results] == ["daisy.jpg", "notes.txt", "rose.jpg", "sunflower.jpg", "empty.jpg"]
        assert [r["status"] for r in results] == [200, 415, 200, 200, 400]
        assert "not a readable image" in results[1]["error"] and results[1]["predictions"] is None
        for r in results[:1] + results[2:4]:
            one = predictor.predict(photo(r["filename"]).read_bytes(), 2)
            assert [p["category"] for p in r["predictions"]] == one.categories

        big = [("files", ("big.jpg", b"\xff" * 600_000, "image/jpeg")), files[0]]
        results = http.post("/predict/batch", files=big).json()["results"]
        assert [r["status"] for r in results] == [413, 200]  # the per-file limit, the others still answered

        many = [files[0]] * (MAX_BATCH_FILES + 1)
        response = http.post("/predict/batch", files=many)
        assert response.status_code == 413 and f"at most {MAX_BATCH_FILES} photos" in response.json()["detail"]
        assert http.post("/predict/batch", params={"top_k": 99}, files=files[:1]).status_code == 400
        assert http.post("/predict/batch").status_code == 422


def test_a_folder_with_an_onnx_model_never_imports_torch(models, album):
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; from flower_classifier.cli import single_command_main; "
            f"code = single_command_main('predict', 'predict.py', [{str(album)!r}, {str(models['onnx'])!r}]); "
            "print('torch' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.splitlines()[-1] == "False 0", done.stderr


def test_options_may_sit_between_the_photos(models, album, capsys):
    daisy, rose = album / "daisy.jpg", album / "rose.jpg"
    assert predict(daisy, "--top_k", "1", rose, models["onnx"]) == 0
    assert predict(daisy, rose, "--top-k", "1", models["onnx"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"Top 1 for {daisy}:") == 2 and out.count(f"Top 1 for {rose}:") == 2
    with pytest.raises(SystemExit) as exit:
        predict(daisy, models["onnx"], "--lerning_rate", "3")
    assert exit.value.code == 2
    assert "unrecognized arguments: --lerning_rate 3" in capsys.readouterr().err


def test_a_thin_photo_is_one_line_alone_and_skipped_among_others(models, album, capsys):
    """A 1x12,000 PNG of a few hundred bytes: once a MemoryError traceback after GBs of resizing."""
    from PIL import Image

    Image.new("RGB", (1, 12_000), (200, 60, 90)).save(album / "strip.png")
    assert predict(album / "strip.png", models["onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "strip.png: too thin to use (1x12000" in err[0]
    assert predict(album / "strip.png", album / "daisy.jpg", models["pytorch"]) == 0
    out, err = capsys.readouterr()
    assert "warning: skipping" in err and "too thin" in err and out.count("Top ") == 1


def test_a_names_file_with_a_huge_name_warns_in_short_lines(models, album, tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "x" * 10_000_000, "2": "dandelion"}))
    assert predict(album / "daisy.jpg", models["pytorch"], "--category_names", names, "--top_k", "1") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings and all(len(line) < 600 for line in warnings), [len(w) for w in warnings]
