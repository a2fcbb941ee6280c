"""The tutorial notebook: committed clean, and runs top to bottom (tiny backbone, generated photos).

After the run, probe cells (tagged `probe-NAME`) redo what a learner does by hand in the same kernel:
rerun the training cell, edit a knob and skip a cell, try another photo or device.
"""
import re
import shutil

import nbformat
import pytest
import torch

from conftest import ROOT, make_dataset
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.notebook import execute_notebook, inject_parameters, knob_names, main, parse_value

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


def test_knobs_are_matched_by_whole_name(capsys):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for fragment in ("UNITS", "RATE", "DIR", "SIZE", "ARC"):  # parts of HIDDEN_UNITS, LEARNING_RATE, ...
        with pytest.raises(ValueError, match=rf"not knobs of this notebook: {fragment} \(its knobs: DATA_DIR, "):
            inject_parameters(nb, {fragment: 1})
    inject_parameters(nb, {"HIDDEN_UNITS": [8], "LEARNING_RATE": 0.1})
    assert knob_names('A = 1  # B = 2\nC = "D = 3"\nprint(A)\n') == ["A", "C"]
    assert main([str(NOTEBOOK), "-p", "UNITS", "8"]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "UNITS" in message and "HIDDEN_UNITS, DROPOUT, LEARNING_RATE" in message


def test_relative_paths_are_the_callers(tmp_path, monkeypatch):
    """`-p` values and `--save_to` both resolve against the current folder, not the notebook's; the
    notebook still imports the modules next to it."""
    notebook_dir, caller = tmp_path / "notebooks", tmp_path / "caller"
    notebook_dir.mkdir()
    caller.mkdir()
    (notebook_dir / "next_to_it.py").write_text('WORD = "written"\n')
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('OUT = "default.txt"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('from next_to_it import WORD\nopen(OUT, "w").write(WORD)')]
    nbformat.write(nb, notebook_dir / "tiny.ipynb")
    monkeypatch.chdir(caller)
    assert main([str(notebook_dir / "tiny.ipynb"), "-p", "OUT", "out.txt", "--save_to", "runs/run.ipynb"]) == 0
    assert (caller / "out.txt").read_text() == "written" and (caller / "runs" / "run.ipynb").is_file()
    assert not (notebook_dir / "out.txt").exists()


def _cell(nb, marker: str) -> str:
    """The source of the one code cell containing `marker`, as lines to paste into another cell."""
    (source,) = [c.source for c in code_cells(nb) if marker in c.source]
    return source + "\n"


def _probes(nb, tmp) -> dict[str, str]:
    """Code a learner might run after the notebook, by name; names ending in `!` are expected to fail."""
    config, training = _cell(nb, "config = TrainConfig("), _cell(nb, "for epoch in keep_awake(")
    photo = (_cell(nb, "photo_path = ") + _cell(nb, "prediction = predict(") + _cell(nb, "plot_prediction(photo,")
             + 'print("title:", fig.axes[0].get_title())\n')
    elsewhere = tmp / "elsewhere" / "1" / "daisy.jpg"  # a category's name, but outside DATA_DIR
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "daisy.jpg", elsewhere)
    missing_gpu = "mps" if torch.cuda.is_available() else "cuda"
    return {
        "title": 'print("title:", fig.axes[0].get_title())',
        "rerun": training,
        "photo-outside-the-data": f"PHOTO = {str(ROOT / 'tests' / 'data' / 'daisy.jpg')!r}\n" + photo,
        "photo-in-a-category-named-folder-elsewhere": f"PHOTO = {str(elsewhere)!r}\n" + photo,
        "ARCH-edited-config-not-rerun!": 'ARCH = "efficientnet_lite0"\n' + training,
        "ARCH-edited-backbone-not-rerun!": 'ARCH = "efficientnet_lite0"\n' + config + training,
        "config-changed-after-training-then-save!": ('ARCH = "tiny"\n' + config + "HIDDEN_UNITS = [32]\n" + config
                                                      + _cell(nb, "save_checkpoint(")),
        "missing-GPU-one-number-of-hidden-units": f"DEVICE = {missing_gpu!r}\nHIDDEN_UNITS = 16\n" + config,
        "unknown-device!": 'DEVICE = "gpu"\n' + config,
    }


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook copied into another folder and run there, with relative paths and the default SAVE_DIR."""
    tmp = tmp_path_factory.mktemp("notebook")
    make_dataset(tmp / "flowers", CLASSES, per_split={"train": 4, "valid": 2, "test": 2})
    knobs = {"DATA_DIR": "flowers", "CATEGORY_NAMES": str(ROOT / "cat_to_name.json"), "ARCH": "tiny",
             "HIDDEN_UNITS": [16], "EPOCHS": 3, "BATCH_SIZE": 8, "DEVICE": "cpu", "NUM_WORKERS": 0,
             "ASSETS_DIR": "assets"}
    nb = inject_parameters(nbformat.read(NOTEBOOK, as_version=4), knobs)
    for name, source in _probes(nb, tmp).items():
        tags = [f"probe-{name}"] + (["raises-exception"] if name.endswith("!") else [])
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    path = tmp / "with_probes.ipynb"
    nbformat.write(nb, path)
    # A copy run in another folder, with the package importable and nothing else of the project's
    # (a top-level module such as workspace_utils would not be, from a copy in runs/).
    (tmp / "site").mkdir()
    (tmp / "site" / "flower_classifier").symlink_to(ROOT / "flower_classifier")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        patch.setenv("PYTHONPATH", str(tmp / "site"))  # this checkout's package, ahead of the installed one
        nb = execute_notebook(path, timeout=120)
    return nb, tmp


def _notebook_cells(nb):
    return [c for c in code_cells(nb) if not any(t.startswith("probe-") for t in c.metadata.get("tags", []))]


def _text(nb, cells=None) -> str:
    """Everything the cells (default: the notebook's own) printed."""
    cells = _notebook_cells(nb) if cells is None else cells
    return "\n".join(o.get("text", "") for cell in cells for o in cell.outputs if o.get("name") == "stdout")


def _probe(nb, name: str) -> tuple[str, str]:
    """What the probe printed, and its error's one line ('' if none)."""
    (cell,) = [c for c in code_cells(nb) if f"probe-{name}" in c.metadata.get("tags", [])]
    errors = [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]
    return _text(nb, [cell]), "\n".join(errors)


def test_notebook_runs_top_to_bottom(executed):
    nb, tmp = executed
    text = _text(nb)
    assert "6 categories: 24 training, 12 validation, 12 test images" in text
    assert re.search(r"Epoch 3/3  training loss [\d.]+  validation loss [\d.]+  validation accuracy", text)
    assert "same scores as before: True" in text
    assert "unknown when the mahalanobis score is above" in text  # section 11b calibrated the loaded model
    # Its own folder, so that it leaves train.py's checkpoints/checkpoint.pth alone.
    assert (tmp / "checkpoints" / "notebook" / "checkpoint.pth").is_file()
    assert not (tmp / "checkpoints" / "checkpoint.pth").exists()
    # Section 12 fine-tuned the top block of the tiny backbone's two, on cached activations.
    assert "tiny has 2 blocks; the top 1 train with a new head" in text
    assert re.search(r"top 1 blocks fine-tuned too: test accuracy [\d.]+%", text)
    assert load_checkpoint(tmp / "checkpoints" / "notebook" / "finetuned" / "checkpoint.pth").top_state
    images = sum(1 for c in _notebook_cells(nb) for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 6  # grid, curves, confusion matrix, mistakes, imshow pair, sanity check


def _epochs(text: str) -> list[str]:
    """The training cell's epoch lines, without their timings."""
    return [re.sub(r"  \([\d.]+ s\)$", "", line) for line in text.splitlines()
            if line.startswith("Epoch ") and "training loss" in line]  # not section 12's run_training lines


def test_rerunning_the_training_cell_repeats_the_run(executed):
    nb, _ = executed
    printed, error = _probe(nb, "rerun")
    first, rerun = _epochs(_text(nb)), _epochs(printed)
    assert len(first) == 3 and not error
    assert rerun == first  # a fresh head from the same seed, not two more epochs of the old one


def test_the_best_epoch_is_tested_and_saved(executed):
    from flower_classifier.checkpoint import load_checkpoint

    nb, tmp = executed
    text = _text(nb)
    accuracies = [float(re.search(r"validation accuracy ([\d.]+)%", line).group(1)) for line in _epochs(text)]
    best = accuracies.index(max(accuracies)) + 1  # the first of equals, as train.py keeps it
    assert f"Kept epoch {best} of 3, the best by validation accuracy ({max(accuracies):.1f}%)" in text
    assert f"epoch {best} (the best by validation accuracy): test accuracy" in text
    saved = load_checkpoint(tmp / "checkpoints" / "notebook" / "checkpoint.pth")
    assert saved.epoch == best and len(saved.history) == best
    assert round(100 * saved.metrics["valid_accuracy"], 1) == max(accuracies)
    assert f"epoch {best}, 6 categories; same scores as before: True" in text  # the model in memory is the best


def test_a_saved_notebook_keeps_no_empty_outputs(executed):
    """Progress bars redrawn with carriage returns leave blank outputs in a saved notebook."""
    nb, _ = executed
    outputs = [o for c in _notebook_cells(nb) for o in c.outputs if o.output_type == "stream"]
    blank = [o for o in outputs if not o.text.replace("\r", "").strip()]
    assert outputs and not blank
    assert not [o.text for o in outputs if o.name == "stderr"]


@pytest.mark.parametrize("probe", ["ARCH-edited-config-not-rerun!", "ARCH-edited-backbone-not-rerun!"])
def test_training_stops_when_a_knob_changed_after_the_cells_above(executed, probe):
    nb, _ = executed
    printed, error = _probe(nb, probe)
    assert "Epoch" not in printed
    assert error.startswith("UserError: ARCH changed after the cells above ran: rerun them, from the config cell")
    assert "\n" not in error


def test_a_head_is_saved_only_with_the_config_it_was_trained_with(executed):
    nb, _ = executed
    _, error = _probe(nb, "config-changed-after-training-then-save!")
    assert error.startswith("UserError: the config, backbone or categories changed after the training cell ran")


def test_a_true_name_only_for_photos_in_the_data_categories(executed):
    nb, _ = executed
    assert _probe(nb, "title") == ("title: true: pink primrose\n", "")  # the first test photo, category "1"
    for probe in ("photo-outside-the-data", "photo-in-a-category-named-folder-elsewhere"):
        printed, error = _probe(nb, probe)
        assert not error and "title: daisy.jpg (true name unknown)" in printed


def test_config_cell_takes_one_hidden_size_and_a_missing_gpu(executed):
    nb, _ = executed
    printed, error = _probe(nb, "missing-GPU-one-number-of-hidden-units")
    assert not error and "hidden_units=(16,)" in printed and "device: cpu" in printed
    assert re.search(r"DEVICE = '\w+': this machine has no \w+ device, so everything runs on the CPU", printed)
    _, error = _probe(nb, "unknown-device!")
    assert error == 'UserError: DEVICE must be "auto", "cpu", "cuda" or "mps" (got \'gpu\')'


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
