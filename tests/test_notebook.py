"""The tutorial notebook: committed clean, built by the learner (its pieces agree with the package's),
and runs top to bottom (tiny backbone, generated photos).

The pieces the learner writes (cells tagged `build-...`) are run here outside a kernel and compared
with the package's own: preprocessing with `process_image`, the head with `build_head`, an epoch of
the training cell with `train_one_epoch`, top-k with the predictor. After the whole run, probe cells
(tagged `probe-NAME`) redo what a learner does by hand in the same kernel: rerun the training cell,
edit a knob and skip cells, try another photo or device.
"""
import ast
import io
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_dataset
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.errors import UserError
from flower_classifier.images import Preprocessing
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


# ---------------------------------------------------------------- the notebook's shape

BUILT = {"build-preprocessing": "process_photo", "build-head": "make_head", "build-training": None,
         "build-top-k": None, "build-plot": "show_top_k"}  # tag -> the function the learner writes there


def _tagged(nb, tag: str) -> str:
    (source,) = [c.source for c in code_cells(nb) if tag in c.metadata.get("tags", [])]
    return source


def _cell(nb, marker: str) -> str:
    """The source of the one code cell containing `marker`, as lines to paste into another cell."""
    (source,) = [c.source for c in code_cells(nb) if marker in c.source]
    return source + "\n"


def test_notebook_follows_the_house_style():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", [])  # the knobs come first
    assert "ARCH = " in first.source and "ASSETS_DIR = None" in first.source
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    for before, cell in zip(nb.cells, nb.cells[1:]):  # a sentence of why before every code cell
        if cell.cell_type == "code":
            assert before.cell_type == "markdown" and before.source.strip(), cell.source[:60]
    # The out-of-order guard is one call, not a check in every cell.
    sources = "\n".join(c.source for c in code_cells(nb))
    assert sources.count("watch_cells(") == 1 and "check_" not in sources and "knobs_now" not in sources


def test_the_step_list_is_the_headings():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    steps = re.findall(r"^(\d+)\. (.+)$", markdown[0], re.M)
    headings = [h for source in markdown[1:] for h in re.findall(r"^## (\d+)\. (.+)$", source, re.M)]
    assert steps and steps == headings
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1))
    assert not re.search(r"^#+ \d+[a-z]", "\n".join(markdown), re.M)  # no 11b


def test_the_learner_writes_the_steps():
    """What the learner came to see is code in the cells, not a call into the package."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = {tag: _tagged(nb, tag) for tag in BUILT}
    for token in ("resize(", "crop(", "/ 255", "p.mean", "p.std", "transpose(2, 0, 1)"):
        assert token in cells["build-preprocessing"]
    for token in ("nn.Linear", "nn.ReLU()", "nn.Dropout", "nn.Sequential"):
        assert token in cells["build-head"]
    for token in ("logits = head(features)", "loss_fn(logits, labels)", "loss.backward()", "optimizer.step()",
                  "evaluate(head, valid_loader"):
        assert token in cells["build-training"]
    assert "torch.softmax(" in cells["build-top-k"] and ".topk(" in cells["build-top-k"]
    assert "barh(" in cells["build-plot"]
    # The functions the cells define are the ones compared with the package below, and no others.
    defined = {node.name for c in code_cells(nb) for node in ast.walk(ast.parse(c.source))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {name for name in BUILT.values() if name}


# ---------------------------------------------------------------- the learner's pieces against the package's

def _run_cells(*sources: str, **namespace) -> dict:
    """Run notebook cells in a fresh namespace (after the imports cell), as a script; returns it."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {**namespace}
    with redirect_stdout(io.StringIO()) as printed:
        exec(_cell(nb, "watch_cells(globals())"), namespace)  # outside IPython the guard does nothing
        for source in sources:
            exec(source, namespace)
    namespace["printed"] = printed.getvalue()
    return namespace


def _photo(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("preprocessing", [Preprocessing(32, 36),
                                           Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")])
@pytest.mark.parametrize("size", [(300, 200), (123, 457), (256, 256)])
def test_the_learners_preprocessing_is_process_image(preprocessing, size):
    from flower_classifier.predictor import process_image

    nb = nbformat.read(NOTEBOOK, as_version=4)
    process_photo = _run_cells(_tagged(nb, "build-preprocessing"))["process_photo"]
    photo = _photo(size)
    mine = process_photo(photo, preprocessing)
    assert mine.shape == (3, preprocessing.input_size, preprocessing.input_size) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, process_image(photo, preprocessing).numpy(), atol=1e-6)


def test_the_learners_head_is_build_head():
    from flower_classifier.model import build_head

    nb = nbformat.read(NOTEBOOK, as_version=4)
    make_head = _run_cells(_tagged(nb, "build-head"))["make_head"]
    for hidden in ([], [8], [12, 6]):
        torch.manual_seed(3)
        mine = make_head(20, hidden, 5, 0.3)
        torch.manual_seed(3)
        package = build_head(20, hidden, 5, 0.3)
        assert [type(m) for m in mine] == [type(m) for m in package]
        assert [m.p for m in mine if isinstance(m, torch.nn.Dropout)] == [0.3] * len(hidden)
        mine_state, package_state = mine.state_dict(), package.state_dict()
        assert mine_state.keys() == package_state.keys()  # so a checkpoint of one loads into the other
        assert all(torch.equal(mine_state[k], package_state[k]) for k in mine_state)


def test_the_learners_training_epoch_is_train_one_epoch():
    """One epoch of the notebook's loop moves the head's weights exactly as the package's step does."""
    from flower_classifier.config import TrainConfig
    from flower_classifier.features import FeatureSet, feature_loader
    from flower_classifier.model import build_head
    from flower_classifier.training import make_optimizer, seed_epoch, train_one_epoch

    nb = nbformat.read(NOTEBOOK, as_version=4)
    generator = torch.Generator().manual_seed(0)
    train = FeatureSet(torch.randn(40, 16, generator=generator), torch.arange(40) % 4)
    valid = FeatureSet(torch.randn(12, 16, generator=generator), torch.arange(12) % 4)
    config = TrainConfig(arch="tiny", hidden_units=[8], dropout=0.3, learning_rate=0.01, epochs=1, batch_size=8)
    loaders = dict(train_loader=feature_loader(train, batch_size=8, shuffle=True, seed=5),
                   valid_loader=feature_loader(valid, batch_size=256, shuffle=False))
    ns = _run_cells(_tagged(nb, "build-head"), _tagged(nb, "build-training"), SEED=5, config=config,
                    backbone=SimpleNamespace(feature_dim=16), classes=list("abcd"), device=torch.device("cpu"),
                    **loaders)
    assert re.search(r"Epoch 1/1  training loss [\d.]+  validation loss [\d.]+  validation accuracy", ns["printed"])

    torch.manual_seed(5)
    head = build_head(16, config.hidden_units, 4, config.dropout)
    optimizer = make_optimizer(head, config)
    seed_epoch(loaders["train_loader"], 5, 1)
    result = train_one_epoch(head, loaders["train_loader"], optimizer, torch.nn.CrossEntropyLoss(),
                             torch.device("cpu"), progress=False)
    mine = ns["head"].state_dict()
    assert all(torch.allclose(mine[k], v, atol=1e-6) for k, v in head.state_dict().items())
    assert ns["history"][0]["train_loss"] == pytest.approx(result["loss"])
    assert ns["history"][0]["train_accuracy"] == pytest.approx(result["accuracy"])
    assert not ns["head"].training  # left in eval mode for what follows


def test_the_learners_top_k_is_the_predictors():
    from flower_classifier.backbones import build_backbone
    from flower_classifier.calibration import Calibration
    from flower_classifier.model import FlowerClassifier, build_head
    from flower_classifier.predictor import TorchPredictor

    nb = nbformat.read(NOTEBOOK, as_version=4)
    backbone = build_backbone("tiny")
    classes = [str(i) for i in range(1, 8)]
    cat_to_name = {c: f"flower {c}" for c in classes[:-1]}  # the last shows its number
    torch.manual_seed(0)
    head = build_head(backbone.feature_dim, [16], len(classes), 0.2).eval()
    calibration = Calibration(temperature=1.7)
    model = FlowerClassifier(backbone.module, head, classes=classes, cat_to_name=cat_to_name,
                             preprocessing=backbone.preprocessing, calibration=calibration)
    photo = _photo((90, 60), seed=4)
    ns = _run_cells(_tagged(nb, "build-preprocessing"), _tagged(nb, "build-top-k"), photo=photo,
                    preprocessing=backbone.preprocessing, backbone=backbone, head=head, calibration=calibration,
                    classes=classes, cat_to_name=cat_to_name, device=torch.device("cpu"),
                    predictor=TorchPredictor(model))
    answer = TorchPredictor(model).predict(photo)
    assert ns["top_names"] == answer.names and len(answer.names) == 5
    np.testing.assert_allclose(ns["top_p"].numpy(), answer.probabilities, atol=1e-5)
    assert "the package's predictor agrees: True" in ns["printed"]


def test_the_plot_puts_the_names_beside_the_photo():
    """Photo left, bars right with the names (most likely on top), and no blank band between them."""
    import matplotlib

    matplotlib.use("Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = _tagged(nb, "build-plot")
    show_top_k = _run_cells(source[:source.index("\n\n\nin_the_data")])["show_top_k"]
    names = ["rose", "tulip", "daisy", "sunflower", "dandelion"]
    for size in ((500, 375), (375, 500), (224, 224)):  # landscape, portrait, square
        fig = show_top_k(_photo(size), names, [0.6, 0.2, 0.1, 0.06, 0.04], "true: rose")
        fig.canvas.draw()
        ax_photo, ax_bars = fig.axes
        assert [t.get_text() for t in ax_bars.get_yticklabels()] == names[::-1]
        renderer = fig.canvas.get_renderer()
        photo_box, bars_box = ax_photo.get_window_extent(renderer), ax_bars.get_tightbbox(renderer)
        gap = (bars_box.x0 - photo_box.x1) / fig.bbox.width
        assert 0 <= gap < 0.03, (size, gap)
        matplotlib.pyplot.close(fig)


# ---------------------------------------------------------------- tutorial.py

def test_without_oxford_102_the_shared_sample_is_used(tmp_path, monkeypatch, capsys):
    from flower_classifier.tutorial import find_data

    project = tmp_path / "work" / "project"
    project.mkdir(parents=True)
    monkeypatch.chdir(project)
    with pytest.raises(UserError, match="python -m flower_classifier download flowers"):
        find_data("flowers")  # neither Oxford 102 nor the sample
    make_dataset(tmp_path / "work" / "shared" / "data" / "flower_photos_sample", ["1", "2"])
    assert find_data("flowers") == Path("../shared/data/flower_photos_sample")
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "uses the 300-photo sample in ../shared/data/flower_photos_sample" in said
    with pytest.raises(UserError, match="does not exist"):
        find_data("my_flowers")  # a folder asked for by name is not replaced
    make_dataset(project / "flowers", ["1", "2"])
    assert find_data("flowers") == Path("flowers") and capsys.readouterr().out == ""


def test_a_backbone_that_cannot_be_downloaded_is_replaced_by_the_offline_one(monkeypatch, capsys):
    from flower_classifier import tutorial
    from flower_classifier.backbones import OFFLINE_CHOICE, build_backbone

    asked = []

    def offline(name):
        asked.append(name)
        if name == "vgg16":
            raise UserError("could not download the pretrained vgg16 weights (no network)")
        return build_backbone("tiny")

    monkeypatch.setattr(tutorial, "build_backbone", offline)
    tutorial.load_backbone("vgg16")
    assert asked == ["vgg16", OFFLINE_CHOICE]
    said = capsys.readouterr().out
    assert "could not download" in said and f"So this run uses {OFFLINE_CHOICE}" in said
    with pytest.raises(UserError, match="unknown --arch"):
        tutorial.load_backbone("vgg17")


class _Cells:
    """A namespace and a CellWatch, with cells run as IPython would run them."""

    def __init__(self):
        from flower_classifier.tutorial import CellWatch

        self.namespace, self.count = {}, 0
        self.watch = CellWatch(self.namespace)

    def run(self, source: str) -> None:
        self.count += 1
        tree = ast.parse(source)
        problem = self.watch.problem(tree)
        if problem:
            self.watch.finish(self.count)  # IPython tells the watch that the (refused) cell ended, too
            raise UserError(problem)
        self.watch.start(tree)
        try:
            exec(source, self.namespace)
        finally:
            self.watch.finish(self.count)


def test_the_guard_stops_a_cell_that_mixes_old_and_new():
    cells = _cells_run()
    cells.run("print(head)")  # [5] nothing changed: it runs
    cells.run("ARCH = 'b'")
    with pytest.raises(UserError, match=r"^ARCH changed after cell \[2\] used it, and this cell reads `head`, made "
                                        r"from the old value: run the cells from \[2\] down to this one again"):
        cells.run("print(head)")  # [7], refused
    cells.run("ARCH = 'a'")  # back as it was: nothing is stale
    cells.run("print(head)")
    cells.run("features = ARCH * 3")  # [10] made again; cell [4] made head from the old one
    with pytest.raises(UserError, match=r"^`features` was made again \(cell \[10\]\) after cell \[4\] used it, "
                                        r"and this cell reads `head`, made from the old one: run the cells from \[4\]"):
        cells.run("print(head)")
    cells.run("head = features + '!'")  # a cell that makes it anew is fine
    cells.run("print(head)")
    cells.run("backbone = backbone.lower()")  # made again from its old self: still made from ARCH
    cells.run("ARCH = 'c'")
    with pytest.raises(UserError, match=r"^ARCH changed after cell \[2\] used it, and this cell reads `backbone`"):
        cells.run("print(backbone)")


def _cells_run() -> "_Cells":
    cells = _Cells()
    cells.run("ARCH = 'a'\nSEED = 0")  # [1] the knobs
    cells.run("backbone = ARCH.upper()")  # [2]
    cells.run("features = backbone * 2")  # [3]
    cells.run("head = features + str(SEED)")  # [4]
    return cells


def test_the_guard_counts_only_names_read_before_the_cell_makes_them():
    from flower_classifier.tutorial import cell_flow

    outside, made = cell_flow("head = make(x)\nhead.train()\nfig = show(head, y)\nx = f(x)\n"
                              "def g(a):\n    b = a + z\n    return b\nfor f, l in loader:\n    out = f + l + w\n"
                              "names = [m.name for m in models]\nimport numpy as np")
    assert outside == {"make", "x", "show", "y", "f", "z", "loader", "w", "models"}
    assert made["fig"] == {"show", "make", "x", "y"} and made["x"] == {"f", "x"} and made["g"] == {"z"}
    assert made["out"] == {"loader", "w"} and made["names"] == {"models"} and made["np"] == set()
    assert "m" not in made and "b" not in made
    cells = _cells_run()
    cells.run("SEED = 1")
    cells.run("head = features + str(SEED)\nprint(head)")  # remakes head before reading it: runs
    cells.run("HIDDEN = [8]")
    cells.run("HIDDEN.append(4)")  # a knob changed in place changes too
    cells.run("model = head")
    cells.run("HIDDEN = [8, 4]")  # the same value again: nothing is stale
    cells.run("print(model)")


# ---------------------------------------------------------------- the whole notebook in a kernel

def _probes(nb, tmp) -> list[tuple[str, str]]:
    """Cells a learner might run after the notebook, in order; names ending in `!` are expected to fail."""
    knobs = _tagged(nb, "parameters") + "\n" + _tagged(nb, "injected-parameters")
    config, backbone, training = _cell(nb, "config = TrainConfig("), _cell(nb, "backbone = load_backbone("), \
        _tagged(nb, "build-training")
    photo = (_cell(nb, "photo_path = ") + _tagged(nb, "build-top-k") + "\n" + _tagged(nb, "build-plot")
             + '\nprint("title:", fig.axes[0].get_title())\n')
    elsewhere = tmp / "elsewhere" / "1" / "daisy.jpg"  # a category's name, but outside DATA_DIR
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "daisy.jpg", elsewhere)
    missing_gpu = "mps" if torch.cuda.is_available() else "cuda"
    return [
        ("title", _tagged(nb, "build-plot") + '\nprint("title:", fig.axes[0].get_title())'),
        ("photo-outside-the-data", f"PHOTO = {str(ROOT / 'tests' / 'data' / 'daisy.jpg')!r}"),
        ("photo-outside-the-data-shown", photo),
        ("photo-in-a-category-named-folder-elsewhere", f"PHOTO = {str(elsewhere)!r}"),
        ("photo-in-a-category-named-folder-elsewhere-shown", photo),
        ("rerun", training),
        ("rerun-then-predict!", _tagged(nb, "build-top-k")),  # the calibration is the old head's
        ("knobs-rerun-unchanged", knobs),
        ("knobs-rerun-unchanged-then-train", training),
        ("ARCH-edited", 'ARCH = "efficientnet_lite0"'),
        ("ARCH-edited-then-train!", training),
        ("ARCH-back", 'ARCH = "tiny"'),
        ("HIDDEN_UNITS-edited", "HIDDEN_UNITS = [32]"),
        ("HIDDEN_UNITS-edited-then-save!", _cell(nb, "save_checkpoint(")),
        ("HIDDEN_UNITS-back", "HIDDEN_UNITS = [16]"),
        ("backbone-made-again", backbone),
        ("backbone-made-again-then-train!", training),
        ("missing-GPU-one-number-of-hidden-units", f"DEVICE = {missing_gpu!r}\nHIDDEN_UNITS = 16"),
        ("missing-GPU-one-number-of-hidden-units-config", config),
        ("unknown-device", 'DEVICE = "gpu"'),
        ("unknown-device-config!", config),
    ]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook copied into another folder and run there, with relative paths and the default SAVE_DIR."""
    tmp = tmp_path_factory.mktemp("notebook")
    make_dataset(tmp / "flowers", CLASSES, per_split={"train": 4, "valid": 2, "test": 2})
    knobs = {"DATA_DIR": "flowers", "CATEGORY_NAMES": str(ROOT / "cat_to_name.json"), "ARCH": "tiny",
             "HIDDEN_UNITS": [16], "EPOCHS": 3, "BATCH_SIZE": 8, "DEVICE": "cpu", "NUM_WORKERS": 0,
             "ASSETS_DIR": "assets"}
    nb = inject_parameters(nbformat.read(NOTEBOOK, as_version=4), knobs)
    for name, source in _probes(nb, tmp):
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
    # A cell's stdout can arrive in several stream chunks, cut anywhere (even inside one print's line):
    # joined as they came within a cell, one cell from the next by a line break.
    return "\n".join("".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout") for cell in cells)


def _probe(nb, name: str) -> tuple[str, str]:
    """What the probe printed, and its error's one line ('' if none)."""
    (cell,) = [c for c in code_cells(nb) if f"probe-{name}" in c.metadata.get("tags", [])]
    errors = [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]
    return _text(nb, [cell]), "\n".join(errors)


def test_notebook_runs_top_to_bottom(executed):
    nb, tmp = executed
    text = _text(nb)
    assert "6 categories: 24 training, 12 validation, 12 test photos" in text
    assert "the same as the package's process_image: True" in text
    assert "the same layers as the package's build_head: True" in text
    assert re.search(r"Epoch 3/3  training loss [\d.]+  validation loss [\d.]+  validation accuracy", text)
    assert "the package's predictor agrees: True" in text
    # No temperature is spoken of before there is one: calibration comes before the test report.
    assert text.index("unknown when the near_far score is above") < text.index("after temperature scaling")
    assert "not one of the 6 species (unknown score" in text  # the stripes are no flower
    # Its own folder, so that it leaves train.py's checkpoints/checkpoint.pth alone.
    saved = load_checkpoint(tmp / "checkpoints" / "notebook" / "checkpoint.pth")
    assert saved.calibration is not None and saved.arch == saved.config.arch == "tiny"
    assert not (tmp / "checkpoints" / "checkpoint.pth").exists()
    # Section 14 fine-tuned the top block of the tiny backbone's two, on cached activations.
    assert re.search(r"top 1 blocks fine-tuned too: test accuracy [\d.]+%", text)
    assert load_checkpoint(tmp / "checkpoints" / "notebook" / "finetuned" / "checkpoint.pth").top_state
    images = sum(1 for c in _notebook_cells(nb) for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 7  # photos, what the network sees, curves, confusion matrix, mistakes, top 5, not a flower


def _epochs(text: str) -> list[str]:
    """The training cell's epoch lines."""
    return [line for line in text.splitlines() if line.startswith("Epoch ") and "training loss" in line]


def test_rerunning_the_training_cell_repeats_the_run(executed):
    nb, _ = executed
    printed, error = _probe(nb, "rerun")
    first, rerun = _epochs(_text(nb)), _epochs(printed)
    assert len(first) == 3 and not error
    assert rerun == first  # a fresh head from the same seed, not two more epochs of the old one
    _, error = _probe(nb, "rerun-then-predict!")  # the calibration and predictor below were the first run's
    assert re.match(r"UserError: `(head|best)` was made again \(cell \[\d+\]\) after cell \[\d+\] used it", error)


def test_the_best_epoch_is_tested_and_saved(executed):
    nb, tmp = executed
    text = _text(nb)
    accuracies = [float(re.search(r"validation accuracy ([\d.]+)%", line).group(1)) for line in _epochs(text)]
    best = accuracies.index(max(accuracies)) + 1  # the first of equals, as train.py keeps it
    assert f"Kept epoch {best} of 3, the best by validation accuracy ({max(accuracies):.1f}%)" in text
    assert f"epoch {best} (the best by validation accuracy): test accuracy" in text
    saved = load_checkpoint(tmp / "checkpoints" / "notebook" / "checkpoint.pth")
    assert saved.epoch == best and len(saved.history) == best
    assert round(100 * saved.metrics["valid_accuracy"], 1) == max(accuracies)


def test_a_saved_notebook_keeps_no_empty_outputs(executed):
    """Progress bars redrawn with carriage returns leave blank outputs in a saved notebook."""
    nb, _ = executed
    outputs = [o for c in _notebook_cells(nb) for o in c.outputs if o.output_type == "stream"]
    blank = [o for o in outputs if not o.text.replace("\r", "").strip()]
    assert outputs and not blank
    assert not [o.text for o in outputs if o.name == "stderr"]
    assert not [o for c in _notebook_cells(nb) for o in c.outputs if o.output_type == "execute_result"]


def test_cells_run_out_of_order_stop_in_one_line(executed):
    nb, _ = executed
    for name in ("knobs-rerun-unchanged", "knobs-rerun-unchanged-then-train", "ARCH-edited", "ARCH-back"):
        assert not _probe(nb, name)[1], name  # the same values again change nothing
    printed, error = _probe(nb, "ARCH-edited-then-train!")
    assert "Epoch" not in printed
    assert re.fullmatch(r"UserError: ARCH changed after cell \[\d+\] used it, and this cell reads `\w+`, made from the "
                        r"old value: run the cells from \[\d+\] down to this one again, in order \(or Kernel → Restart "
                        r"Kernel and Run All Cells\)", error)
    _, error = _probe(nb, "HIDDEN_UNITS-edited-then-save!")
    assert error.startswith("UserError: HIDDEN_UNITS changed after cell [")
    printed, error = _probe(nb, "backbone-made-again-then-train!")
    assert "Epoch" not in printed and error.startswith("UserError: `backbone` was made again (cell [")


def test_a_true_name_only_for_photos_in_the_data_categories(executed):
    nb, _ = executed
    assert _probe(nb, "title") == ("title: true: pink primrose\n", "")  # the first test photo, category "1"
    for probe in ("photo-outside-the-data-shown", "photo-in-a-category-named-folder-elsewhere-shown"):
        printed, error = _probe(nb, probe)
        assert not error and "title: daisy.jpg (true name unknown)" in printed


def test_config_cell_takes_one_hidden_size_and_a_missing_gpu(executed):
    nb, _ = executed
    printed, error = _probe(nb, "missing-GPU-one-number-of-hidden-units-config")
    assert not error and "hidden_units=(16,)" in printed and "device: cpu" in printed
    assert re.search(r"DEVICE = '\w+': this machine has no \w+ device, so everything runs on the CPU", printed)
    _, error = _probe(nb, "unknown-device-config!")
    assert error == 'UserError: DEVICE must be "auto", "cpu", "cuda" or "mps" (got \'gpu\')'


def test_assets_are_written_when_asked(executed):
    _, tmp = executed
    names = {p.relative_to(tmp / "assets").as_posix() for p in (tmp / "assets").rglob("*") if p.is_file()}
    assert {"training_images.png", "training_curves.png", "sanity_check.png", "not_a_flower.png",
            "report/confusion_matrix.png", "report/worst_mistakes.png", "report/report.txt"} <= names


def test_missing_data_folder_stops_with_a_plain_message(tmp_path):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError) as e:
        execute_notebook(NOTEBOOK, {"DATA_DIR": str(tmp_path / "flowers"), "ARCH": "tiny", "DEVICE": "cpu"},
                         cwd=ROOT, timeout=60)
    message = str(e.value)
    assert "python -m flower_classifier download flowers" in message
    assert "Traceback" not in message and "File " not in message
