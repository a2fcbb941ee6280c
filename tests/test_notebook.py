"""The tutorial notebook: committed clean, and runs top to bottom (tiny backbone, generated photos)."""
import re

import nbformat
import pytest

from conftest import ROOT, make_dataset
from flower_classifier.notebook import execute_notebook, inject_parameters, parse_value

NOTEBOOK = ROOT / "Image_Classifier_Project.ipynb"
CLASSES = ["1", "2", "3", "4", "5", "6"]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_follows_the_house_style():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "ARCH = " in tagged[0].source and "ASSETS_DIR = None" in tagged[0].source
    for before, cell in zip(nb.cells, nb.cells[1:]):  # a sentence of why before every code cell
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", cell.source[:60]
    for cell in code_cells(nb):  # it imports the package and defines nothing of its own
        assert not re.search(r"^\s*(def|class) ", cell.source, re.M), cell.source[:60]


def test_command_line_values_are_literals_or_strings():
    assert parse_value("5") == 5 and parse_value("0.0003") == 0.0003 and parse_value("[256, 64]") == [256, 64]
    assert parse_value("None") is None and parse_value("../shared/data") == "../shared/data"
    assert parse_value("efficientnet_lite0") == "efficientnet_lite0"


def test_unknown_knob_is_refused():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.raises(ValueError, match="not knobs of this notebook: EPOCH"):
        inject_parameters(nb, {"EPOCH": 1})


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    data = make_dataset(tmp / "flowers", CLASSES, per_split={"train": 4, "valid": 2, "test": 2})
    knobs = {"DATA_DIR": str(data), "ARCH": "tiny", "HIDDEN_UNITS": [16], "EPOCHS": 2, "BATCH_SIZE": 8,
             "DEVICE": "cpu", "NUM_WORKERS": 0, "SAVE_DIR": str(tmp / "checkpoints"),
             "ASSETS_DIR": str(tmp / "assets")}
    nb = execute_notebook(NOTEBOOK, knobs, cwd=ROOT, timeout=120)
    return nb, tmp


def _text(nb) -> str:
    """Everything the cells printed."""
    return "\n".join(o.get("text", "") for cell in code_cells(nb) for o in cell.outputs if o.output_type == "stream")


def test_notebook_runs_top_to_bottom(executed):
    nb, tmp = executed
    text = _text(nb)
    assert "6 categories: 24 training, 12 validation, 12 test images" in text
    assert re.search(r"Epoch 2/2  training loss [\d.]+  validation loss [\d.]+  validation accuracy", text)
    assert "same scores as before: True" in text
    assert (tmp / "checkpoints" / "checkpoint.pth").is_file()
    images = sum(1 for c in code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 6  # grid, curves, confusion matrix, mistakes, imshow pair, sanity check


def test_assets_are_written_when_asked(executed):
    _, tmp = executed
    names = {p.relative_to(tmp / "assets").as_posix() for p in (tmp / "assets").rglob("*") if p.is_file()}
    assert {"training_images.png", "training_curves.png", "sanity_check.png", "report/confusion_matrix.png",
            "report/worst_mistakes.png", "report/report.txt"} <= names


def test_missing_data_folder_stops_with_a_plain_message(tmp_path):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError) as e:
        execute_notebook(NOTEBOOK, {"DATA_DIR": str(tmp_path / "flowers"), "ARCH": "tiny", "DEVICE": "cpu"},
                         cwd=ROOT, timeout=60)
    message = str(e.value)
    assert "python -m flower_classifier download flowers" in message
    assert "Traceback" not in message and "File " not in message
