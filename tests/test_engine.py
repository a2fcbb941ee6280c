"""The feature pass's engine and threads: ONNX Runtime on the CPU by default (features equal to
PyTorch's), a backbone that does not export falls back to PyTorch in one line, the export is kept
in the cache, large JPEGs decode at reduced size, and threads fit the work (--threads wins)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import TWELVE, make_dataset
from flower_classifier import backbones, devices, features, fitting, frozen_pass, training
from flower_classifier.backbones import Backbone, build_backbone
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig
from flower_classifier.data import PhotoList, eval_transform, load_image
from flower_classifier.errors import UserError

pytest.importorskip("onnxruntime")

QUIET = dict(progress=False, log=lambda message: None)
PHOTOS = sorted((Path(__file__).parent / "data").glob("*.jpg"))  # real photos (daisy, rose, sunflower)


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "flowers", TWELVE[:3], per_split={"train": 3, "valid": 1})


@pytest.fixture(autouse=True)
def fresh_sessions(monkeypatch):
    """Each test exports afresh: no ONNX session or failed export carried over from another test."""
    monkeypatch.setattr(frozen_pass, "_onnx_sessions", {})
    monkeypatch.setattr(frozen_pass, "_not_exportable", set())


def _with_weights(name: str) -> bool:
    return backbones.get_spec(name).weights_status().startswith(("weights installed", "weights cached"))


# Pretrained where the weights are here (offline), random weights for the rest: the export must hold
# for every architecture, and the pretrained ones are the features users get.
# lite1/2 without their package cannot be built; vgg13 is vgg16's layers, fewer of them.
BACKBONES = [(name, _with_weights(name)) for name in backbones.BACKBONES
             if _with_weights(name) or not name.startswith("efficientnet_lite") and name != "vgg13"]


@pytest.mark.parametrize("name, pretrained", BACKBONES, ids=[f"{n}-{'pretrained' if p else 'random'}"
                                                              for n, p in BACKBONES])
def test_onnx_features_match_pytorch_on_real_photos(name, pretrained):
    """Every backbone, on real photos, through the feature pass itself (decode, draft, transform)."""
    backbone = build_backbone(name, pretrained=pretrained)
    view = frozen_pass.centre_view(backbone)
    exact, ok = frozen_pass.extract_features(backbone, PHOTOS, view, engine="torch", progress=False)
    onnx, onnx_ok = frozen_pass.extract_features(backbone, PHOTOS, view, engine="onnx", progress=False)
    assert ok.all() and onnx_ok.all() and exact.abs().max() > 0
    assert torch.allclose(onnx, exact, atol=1e-4, rtol=1e-4), (onnx - exact).abs().max()


def test_auto_is_onnx_on_the_cpu_torch_on_a_gpu_and_the_run_records_what_ran(data, tmp_path):
    assert frozen_pass.resolve_engine("auto", "cpu") == "onnx"
    assert frozen_pass.resolve_engine("auto", "cuda") == frozen_pass.resolve_engine("auto", "mps") == "torch"
    assert frozen_pass.resolve_engine("torch", "cpu") == "torch"
    for device in ("cuda", "mps"):  # checked without the device: only the name is looked at
        with pytest.raises(UserError, match="--engine onnx runs the feature pass on the CPU"):
            frozen_pass.resolve_engine("onnx", device)
    messages = []
    config = TrainConfig(arch="tiny", epochs=1, hidden_units=(8,), num_workers=0)
    assert config.engine == "auto"
    result = training.run_training(config, data, save_dir=tmp_path / "run", cache_dir=tmp_path / "c",
                                   progress=False, log=messages.append)
    assert load_checkpoint(result.best_path).config.engine == "onnx"
    assert any("images/s on onnx" in m for m in messages)
    classic = training.run_training(config.replace(feature_cache=False), data, save_dir=tmp_path / "classic",
                                    **QUIET)
    assert load_checkpoint(classic.best_path).config.engine == "torch"  # the classic loop runs PyTorch


class _NoExport(nn.Module):
    """The tiny backbone, with a layer the ONNX exporter cannot handle (it raises while exporting)."""

    def __init__(self, inner, wrong=False):
        super().__init__()
        self.inner, self.wrong = inner, wrong

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            if not self.wrong:
                raise RuntimeError("Exporting the operator 'aten::mystery' to ONNX is not supported\nmore detail")
            return self.inner(x) * 2  # exports, but computes something else
        return self.inner(x)


@pytest.mark.parametrize("wrong", [False, True], ids=["export-raises", "export-differs"])
def test_a_backbone_that_does_not_export_falls_back_to_torch_in_one_line(wrong, data, tmp_path, capsys):
    tiny = build_backbone("tiny")
    backbone = Backbone("oddnet", _NoExport(tiny.module, wrong), tiny.feature_dim, tiny.preprocessing)
    config = TrainConfig(arch="tiny", epochs=1, hidden_units=(8,), num_workers=0)
    result = training.run_training(config, data, save_dir=tmp_path / "run", cache_dir=tmp_path / "c", backbone=backbone,
                                   **QUIET)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "oddnet could not be exported to ONNX" in warnings[0], warnings
    assert ("differ from PyTorch's" if wrong else "aten::mystery") in warnings[0]
    assert load_checkpoint(result.best_path).config.engine == "torch"
    fallback = features.load_feature_data(data, backbone, cache_dir=tmp_path / "c", engine="onnx", **QUIET)
    assert fallback.stats.engine == "torch" and fallback.stats.computed == 0  # torch's rows, cached
    exact = features.load_feature_data(data, tiny, use_disk=False, engine="torch", **QUIET)
    assert torch.equal(fallback.train.features, exact.train.features)
    assert not list((tmp_path / "c").rglob("*.onnx"))  # nothing kept that failed


def test_the_export_is_kept_in_the_cache_and_a_damaged_copy_is_made_again(data, tmp_path, monkeypatch):
    tiny = build_backbone("tiny")
    first = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", engine="onnx", **QUIET)
    (kept,) = (tmp_path / "c").rglob("backbone-*.onnx")
    exports = []
    real_export = frozen_pass._export
    monkeypatch.setattr(frozen_pass, "_export", lambda b: exports.append(b) or real_export(b))

    def rerun():  # as a new process would: no session in memory, the rows of one view gone
        frozen_pass._onnx_sessions.clear()
        for view_dir in kept.parent.glob("centre-*"):
            for f in view_dir.iterdir():
                f.unlink()
        return features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", engine="onnx", **QUIET)

    assert torch.equal(rerun().train.features, first.train.features) and exports == []  # read, not exported
    kept.write_bytes(kept.read_bytes()[:-100] + bytes(100))  # damaged on disk
    assert torch.equal(rerun().train.features, first.train.features) and len(exports) == 1
    assert [p.name for p in kept.parent.glob("backbone-*.onnx")] == [kept.name]  # the same bytes again


# ---------------------------------------------------------------- decoding at reduced size

def _smooth_photo(path: Path, size: tuple[int, int]) -> Path:
    """A photo-like JPEG: smooth gradients and shapes (a JPEG's own scaling is exact on no real photo)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    pixels = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.cos(5 * y), 255 * x * (1 - y)], axis=-1)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


@pytest.mark.parametrize("size", [(1600, 1200), (1200, 1600), (700, 520), (520, 300)])
def test_large_jpegs_decode_at_reduced_size_never_below_the_resize_target(size, tmp_path):
    p = build_backbone("efficientnet_lite0", pretrained=False).preprocessing  # resize 256, crop 224
    path = _smooth_photo(tmp_path / "photo.jpg", size)
    drafted = load_image(path, min_size=p.resize_size)
    assert min(drafted.size) >= p.resize_size
    if min(size) >= 2 * p.resize_size:
        assert drafted.width < size[0]  # decoded at 1/2, 1/4 or 1/8: a fraction of the pixels
    else:
        assert drafted.size == size
    full = PhotoList([(path, 0)], eval_transform(p))[0][0]
    reduced = PhotoList([(path, 0)], eval_transform(p), min_size=p.resize_size)[0][0]
    assert reduced.shape == full.shape
    # The tolerance, in normalized units (std 0.5: 1.0 is half the pixel range): DCT scaling differs
    # from an antialiased resize only at the level of fine detail.
    assert (reduced - full).abs().mean() < 0.01 and (reduced - full).abs().max() < 0.25


def test_the_centre_view_decodes_at_reduced_size_and_is_cached_apart(tmp_path):
    tiny = build_backbone("tiny")
    view = frozen_pass.centre_view(tiny)
    assert view.min_size == tiny.preprocessing.resize_size
    assert frozen_pass.augmented_view(tiny, 1).min_size is None  # a random crop may enlarge a small part
    assert view.key("fp32") != frozen_pass.View(view.name, view.transform).key("fp32")


# ---------------------------------------------------------------- threads

def test_decoders_and_engine_threads_share_the_cores(monkeypatch):
    cpu = torch.device("cpu")
    # Under CORES_PER_DECODER cores no worker process: one thread decodes beside the engine on every core.
    for cores, workers, expected in [(2, 4, (0, 2)), (1, 2, (0, 1)), (3, 4, (0, 3)), (16, 4, (4, 12)),
                                     (16, 2, (2, 14)), (8, 0, (0, 8))]:
        monkeypatch.setattr(devices, "cpu_cores", lambda: cores)
        assert frozen_pass.share_cores(workers, cpu) == expected
    with devices.threads(3, chosen=True):
        assert frozen_pass.share_cores(4, cpu) == (2, 3)  # --threads wins; decoders still by the cores
    assert frozen_pass.share_cores(4, torch.device("cuda")) == (4, None)


def test_the_decoding_thread_and_worker_processes_give_the_same_features(data, monkeypatch):
    """2 cores decode in a thread beside the engine, 8 in worker processes: the same rows, in order,
    augmented views included (one thread draws each photo's seeded randomness in turn), and an
    unreadable photo skipped by both."""
    tiny = build_backbone("tiny")
    paths = sorted(data.rglob("*.jpg"))
    (data / "bad.jpg").write_text("not a photo")
    paths = paths[:3] + [data / "bad.jpg"] + paths[3:]
    got = {}
    for cores in (2, 8):
        monkeypatch.setattr(devices, "cpu_cores", lambda: cores)
        assert (frozen_pass.share_cores(2, torch.device("cpu"))[0] > 0) == (cores == 8)
        got[cores] = [frozen_pass.extract_features(tiny, paths, view, num_workers=2, batch_size=3, progress=False)
                      for view in (frozen_pass.centre_view(tiny), frozen_pass.augmented_view(tiny, 1))]
    for (thread, thread_ok), (process, process_ok) in zip(got[2], got[8]):
        assert thread_ok.tolist() == process_ok.tolist() == [p.name != "bad.jpg" for p in paths]
        assert torch.equal(thread, process) and thread[thread_ok].abs().sum() > 0
    assert not torch.equal(got[2][0][0], got[2][1][0])  # the augmented view is another picture


def test_small_heads_train_on_one_thread_large_ones_on_more(monkeypatch):
    monkeypatch.setattr(devices, "cpu_cores", lambda: 8)
    assert fitting.head_threads([1280, 512, 102], 32) == 1  # EfficientNet's head
    assert fitting.head_threads([25088, 4096, 4096, 102], 64) == 8  # capped by the cores
    with devices.threads(2, chosen=True):
        assert fitting.head_threads([1280, 512, 102], 32) == 2


def _record_threads(monkeypatch, module):
    seen = []
    real_fit = module.fit

    def fit(*args, **kwargs):
        if not args[5].finetune:  # a head alone (a search trial may fine-tune blocks: threads by default)
            seen.append((torch.get_num_threads(), devices.chosen_threads()))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(module, "fit", fit)
    return seen


@pytest.mark.parametrize("command", ["train", "search"])
def test_threads_option_applies_to_the_whole_command_and_is_given_back(command, data, tmp_path, monkeypatch,
                                                                       capsys):
    from flower_classifier import search

    monkeypatch.chdir(tmp_path)
    seen = _record_threads(monkeypatch, training if command == "train" else search)
    sessions = []
    monkeypatch.setattr(frozen_pass, "_onnx_sessions", _Recording(sessions))
    before = torch.get_num_threads()
    extra = ["--save_dir", "ck", "--epochs", "1"] if command == "train" else ["--trials", "2"]
    common = [command, str(data), "--arch", "tiny", "--workers", "0", "--quiet", "--cache_dir", "c", *extra]
    assert main(common) == 0
    assert seen and all(s == (1, None) for s in seen)  # by default a tiny head trains on one thread
    seen.clear()
    assert main(common + ["--threads", "3", "--cache_dir", "c2"]) == 0
    assert seen and all(s == (3, 3) for s in seen)
    assert [threads for _, threads in sessions][-1] == 3  # ONNX Runtime was given them too
    assert torch.get_num_threads() == before and devices.chosen_threads() is None
    capsys.readouterr()
    for bad in (["--threads", "0"], ["--engine", "tensorrt"]):
        with pytest.raises(SystemExit) as refused:  # argparse refuses from inside parse_args
            main(common + bad)
        assert refused.value.code == 2 and bad[0] in capsys.readouterr().err


class _Recording(dict):
    """frozen_pass._onnx_sessions, noting each (backbone key, threads) a session is made for."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def __setitem__(self, key, value):
        self.log.append(key)
        super().__setitem__(key, value)


def test_engine_is_checked_like_every_option(tmp_path):
    with pytest.raises(UserError, match="engine must be one of auto, torch, onnx"):
        TrainConfig(engine="tensorrt")
    from flower_classifier.config import load_defaults

    (tmp_path / "h.json").write_text('{"engine": "gpu"}')
    with pytest.raises(UserError, match="h.json: engine must be one of"):
        load_defaults(tmp_path / "h.json")


def test_threads_context_gives_the_callers_setting_back():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with devices.threads(1, chosen=True):
            assert torch.get_num_threads() == 1 and devices.chosen_threads() == 1
            raise RuntimeError("a failing command")
    assert torch.get_num_threads() == before and devices.chosen_threads() is None


# ---------------------------------------------------------------- --threads in every command

@pytest.fixture
def trained(data, tmp_path):
    """A tiny checkpoint trained on `data`, and its ONNX export."""
    assert main(["train", str(data), "--arch", "tiny", "--epochs", "1", "--workers", "0", "--quiet",
                 "--save_dir", str(tmp_path / "ck"), "--cache_dir", str(tmp_path / "c")]) == 0
    checkpoint = tmp_path / "ck" / "checkpoint.pth"
    assert main(["export", str(checkpoint), str(tmp_path / "m.onnx")]) == 0
    return checkpoint, tmp_path / "m.onnx"


def _command(name, data, checkpoint, onnx, tmp_path):
    photo, port = str(PHOTOS[0]), str(free_port())
    return {"calibrate": ["calibrate", str(checkpoint), str(data), "--workers", "0", "--quiet"],
            "evaluate": ["evaluate", str(checkpoint), str(data / "valid"), "--workers", "0"],
            "report": ["report", str(checkpoint), str(data / "valid"), "--workers", "0", "--out", str(tmp_path / "r")],
            "export": ["export", str(checkpoint), str(tmp_path / "again.onnx")],
            "predict": ["predict", photo, str(checkpoint)],
            "predict onnx": ["predict", photo, str(onnx)],
            "serve": ["serve", str(checkpoint), "--port", port],
            "serve onnx": ["serve", str(onnx), "--port", port]}[name]


@pytest.mark.parametrize("name", ["calibrate", "evaluate", "report", "export", "predict", "predict onnx", "serve",
                                  "serve onnx"])
def test_threads_option_sets_the_compute_threads_of_every_command(name, data, trained, tmp_path, monkeypatch,
                                                                   capsys):
    """torch's threads while the command loads its model, and every ONNX Runtime session it opens,
    are --threads N; afterwards the caller's torch setting is back."""
    import onnxruntime
    import uvicorn

    from flower_classifier import checkpoint as checkpoint_module

    argv = _command(name, data, *trained, tmp_path)
    seen, real_load, real_session = [], checkpoint_module.load_checkpoint, onnxruntime.InferenceSession

    def load_checkpoint(path):
        seen.append(("torch", torch.get_num_threads()))
        return real_load(path)

    def session(model, options=None, **kwargs):
        seen.append(("onnx", options.intra_op_num_threads))
        return real_session(model, options, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: sockets[0].close())  # started, not served
    before = torch.get_num_threads()
    for n in (3, 1):
        seen.clear()
        assert main(argv + ["--threads", str(n)]) == 0, capsys.readouterr().err
        engines = {engine for engine, _ in seen}
        if name == "calibrate":  # its feature pass runs ONNX Runtime unless the features are cached already
            assert engines in ({"torch"}, {"torch", "onnx"})
        else:
            assert engines == ({"onnx"} if "onnx" in name else {"torch"})
        assert all(threads == n for _, threads in seen), seen
        assert torch.get_num_threads() == before and devices.chosen_threads() is None
    with pytest.raises(SystemExit) as refused:
        main(argv + ["--threads", "0"])
    assert refused.value.code == 2 and "--threads" in capsys.readouterr().err


def test_every_command_that_computes_takes_threads_and_the_others_refuse_it():
    from flower_classifier.cli import COMMANDS, NO_COMPUTE, build_parser

    _, subparsers = build_parser()
    for name, parser in subparsers.items():
        assert ("--threads" in parser.flags()) == (name not in NO_COMPUTE), name
    assert NO_COMPUTE < set(COMMANDS) and len(COMMANDS) - len(NO_COMPUTE) >= 8


def test_threads_reach_an_onnx_model_run_without_loading_torch(trained):
    """predict.py on an .onnx model stays torch-free with --threads, and its session gets them."""
    _, onnx = trained
    probe = ("import sys, runpy, onnxruntime\n"
             "real = onnxruntime.InferenceSession\n"
             "def session(model, options=None, **kw):\n"
             "    print('THREADS', options.intra_op_num_threads)\n"
             "    return real(model, options, **kw)\n"
             "onnxruntime.InferenceSession = session\n"
             f"sys.argv = ['predict.py', {str(PHOTOS[0])!r}, {str(onnx)!r}, '--threads', '1']\n"
             "try:\n    runpy.run_path('predict.py', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "import os\n"
             "print('EXIT', code, 'TORCH', 'torch' in sys.modules, 'ENV', os.environ.get('OMP_NUM_THREADS'))\n")
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert "THREADS 1" in result.stdout, result.stdout + result.stderr
    assert result.stdout.strip().endswith("EXIT 0 TORCH False ENV None"), result.stdout + result.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine, precision", [([], "onnx-fp32"), (["--engine", "torch"], "centre-fp32")])
def test_calibrate_computes_its_features_on_the_engine_training_uses(engine, precision, data, trained, tmp_path):
    fresh = tmp_path / "fresh"  # nothing cached: calibrate's own feature pass runs
    assert main(["calibrate", str(trained[0]), str(data), "--workers", "0", "--quiet", "--cache_dir", str(fresh),
                 *engine]) == 0
    views = {p.name for p in fresh.glob("*/*") if p.is_dir()}
    assert views and all(precision in v for v in views), views
