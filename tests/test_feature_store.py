"""The feature store: a damaged cache is a miss (one warning, recomputed), never training input; a full
disk trains from memory; a killed pass keeps its pieces; concurrent writers lose nothing; rows are
read memory-mapped; the backbone leaves the GPU after the pass."""
import errno
import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch import nn

from conftest import QUIET, TWELVE, make_dataset
from flower_classifier import feature_store, features, frozen_pass, shards
from flower_classifier.backbones import Backbone, build_backbone
from flower_classifier.cli import main
from flower_classifier.config import TrainConfig
from flower_classifier.data import FlowerFolder
from flower_classifier.training import run_training



@pytest.fixture
def small_pieces(monkeypatch):
    """Shards of 8 rows: 24 images make 3 shards, so damage to one costs 8 recomputed rows."""
    monkeypatch.setattr(features, "PIECE_ROWS", 8)
    monkeypatch.setattr(frozen_pass, "EXTRACT_BATCH", 4)


def _view_dir(cache, backbone):
    (view_dir,) = (cache / feature_store.backbone_key(backbone)).glob("centre-*")
    return view_dir


def _warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def _forge(shard, array, digests=None):
    """Rewrite a shard with a manifest that is consistent (right checksum) for the new array."""
    manifest_file = shard.with_suffix(".json")
    digests = digests if digests is not None else json.loads(manifest_file.read_text())["digests"]
    np.save(shard, array)
    manifest = {"format": feature_store.CACHE_FORMAT, "digests": digests, "checksum": shards.checksum(shard, digests)}
    manifest_file.write_text(json.dumps(manifest))


def _edit_manifest(shard, change):
    manifest_file = shard.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps(change(manifest)))


def _random_bytes_inside(shard):
    raw = bytearray(shard.read_bytes())
    raw[200:200 + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(raw))


def _swap_digests(m):
    m["digests"][0], m["digests"][1] = m["digests"][1], m["digests"][0]
    return m


def _directory_instead(path):
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


DAMAGE = {
    "random bytes in the middle": _random_bytes_inside,
    "truncated": lambda s: s.write_bytes(s.read_bytes()[:len(s.read_bytes()) // 2]),
    "zero-length array file": lambda s: s.write_bytes(b""),
    "zero-length manifest": lambda s: s.with_suffix(".json").write_bytes(b""),
    "array file missing": lambda s: s.unlink(),
    "fewer digests than rows": lambda s: _edit_manifest(s, lambda m: {**m, "digests": m["digests"][:-1]}),
    "digests swapped": lambda s: _edit_manifest(s, _swap_digests),
    "checksum edited": lambda s: _edit_manifest(s, lambda m: {**m, "checksum": "0" * 32}),
    "manifest not an object": lambda s: s.with_suffix(".json").write_text("[1, 2]"),
    "manifest not JSON": lambda s: s.with_suffix(".json").write_text("{digests: oops"),
    "manifest digests not strings": lambda s: _edit_manifest(s, lambda m: {**m, "digests": [1] * 8}),
    "manifest of another format": lambda s: _edit_manifest(s, lambda m: {**m, "format": 1}),
    "wrong width, consistent": lambda s: _forge(s, np.zeros((8, 5), np.float16)),
    "digests and rows disagree, consistent": lambda s: _forge(s, np.zeros((7, 16), np.float16)),
    "NaN rows, consistent": lambda s: _forge(s, np.full((8, 16), np.nan, np.float16)),
    "inf rows, consistent": lambda s: _forge(s, np.full((8, 16), np.inf, np.float16)),
    "wrong dtype, consistent": lambda s: _forge(s, np.zeros((8, 16), np.float32)),
    "column order, consistent": lambda s: _forge(s, np.asfortranarray(np.zeros((8, 16), np.float16))),
    "pickled objects, consistent": lambda s: np.save(s, np.array([{"a": 1}] * 8, dtype=object)),
    "a foreign file with the right name": lambda s: s.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500)),
    "another valid array, same shape": lambda s: np.save(s, np.ones((8, 16), np.float16)),
    "a directory instead of the array": _directory_instead,
    "a directory instead of the manifest": lambda s: _directory_instead(s.with_suffix(".json")),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_shard_is_a_cache_miss_with_one_warning(damage, data, tiny, tmp_path, small_pieces, capsys):
    assert tiny.feature_dim == 16  # the forged arrays above assume it
    clean = features.load_feature_data(data, tiny, use_disk=False, **QUIET)
    features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    view_dir = _view_dir(tmp_path / "c", tiny)
    shard = sorted(view_dir.glob("*.npy"))[0]
    assert len(list(view_dir.glob("*.npy"))) == 3
    capsys.readouterr()
    DAMAGE[damage](shard)
    again = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    (warning,) = _warnings(capsys)
    assert shard.name in warning and "recomputing" in warning
    assert (again.stats.computed, again.stats.cached) == (8, 16)  # only the damaged piece's rows
    assert torch.equal(again.train.features, clean.train.features)
    assert torch.equal(again.valid.features, clean.valid.features)
    third = features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    assert _warnings(capsys) == [] and (third.stats.computed, third.stats.cached) == (0, 24)


def _losses(result):
    return [(h["train_loss"], h["valid_loss"], h["valid_accuracy"]) for h in result.state.history]


def test_garbage_in_the_cache_never_reaches_training(data, tiny, tmp_path, capsys):
    config = TrainConfig(arch="tiny", epochs=2, learning_rate=0.02, hidden_units=(32,), batch_size=4, num_workers=0)
    clean = run_training(config, data, save_dir=tmp_path / "a", backbone=tiny, cache_dir=tmp_path / "c", **QUIET)
    (shard,) = _view_dir(tmp_path / "c", tiny).glob("*.npy")
    _random_bytes_inside(shard)
    capsys.readouterr()
    damaged = run_training(config, data, save_dir=tmp_path / "b", backbone=tiny, cache_dir=tmp_path / "c", **QUIET)
    assert len(_warnings(capsys)) == 1
    assert _losses(damaged) == _losses(clean) and all(np.isfinite(_losses(damaged)).ravel())


def test_full_disk_warns_once_and_trains_from_memory(data, tmp_path, monkeypatch, capsys):
    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "atomic_write", no_space)
    cache = tmp_path / "c"
    code = main(["train", str(data), "--arch", "tiny", "--workers", "0", "--quiet", "--epochs", "1",
                 "--augmented_views", "1", "--cache_dir", str(cache), "--save_dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "ck" / "checkpoint.pth").is_file()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and str(cache) in warnings[0]
    assert "Traceback" not in err and not list(cache.rglob("*.npy"))
    monkeypatch.undo()
    fresh = features.load_feature_data(data, build_backbone("tiny"), augmented_views=1, use_disk=False, **QUIET)
    stored = features.load_feature_data(data, build_backbone("tiny"), augmented_views=1, cache_dir=cache, **QUIET)
    assert stored.stats.computed == 40 and torch.equal(stored.train.features, fresh.train.features)


class _StopsAfter(nn.Module):
    """The tiny backbone, interrupted (as by Ctrl-C or a kill) at its `calls`-th batch."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls -= 1
        if self.calls == 0:
            raise KeyboardInterrupt
        return self.inner(x)


def test_killed_pass_keeps_the_pieces_it_wrote(data, tiny, tmp_path, small_pieces):
    # PyTorch runs the module (an export would call it while tracing).
    stopping = _StopsAfter(tiny.module, calls=5)  # 4 batches of 4 done, in pieces of 8: 2 pieces written
    backbone = Backbone(tiny.name, stopping, tiny.feature_dim, tiny.preprocessing)
    with pytest.raises(KeyboardInterrupt):
        features.load_feature_data(data, backbone, cache_dir=tmp_path / "c", engine="torch", **QUIET)
    train = FlowerFolder(data / "train")
    paths = [p for p, _ in train.samples + FlowerFolder(data / "valid", classes=train.classes).samples]
    store = feature_store.FeatureStore(tmp_path / "c", backbone)
    _, found = store.lookup(frozen_pass.centre_view(backbone).key("fp32"), [feature_store.file_digest(p) for p in paths])
    assert found.tolist() == [True] * 16 + [False] * 8  # the pass's first rows, in its order
    stopping.calls = -1  # never again
    again = features.load_feature_data(data, backbone, cache_dir=tmp_path / "c", engine="torch", **QUIET)
    assert (again.stats.cached, again.stats.computed) == (16, 8)
    fresh = features.load_feature_data(data, tiny, use_disk=False, engine="torch", **QUIET)
    assert torch.equal(again.train.features, fresh.train.features)
    assert torch.equal(again.valid.features, fresh.valid.features)


def test_training_reads_rows_memory_mapped(data, tiny, tmp_path, small_pieces):
    loaded = features.load_feature_data(data, tiny, augmented_views=1, cache_dir=tmp_path / "c", **QUIET)
    assert loaded.train.rows.arrays and all(isinstance(a, np.memmap) for a in loaded.train.rows.arrays)
    again = features.load_feature_data(data, tiny, augmented_views=1, cache_dir=tmp_path / "c", **QUIET)
    assert all(isinstance(a, np.memmap) for a in again.train.rows.arrays)
    x, y = again.train.__getitems__([5, 0, 17, 30])
    assert x.dtype == torch.float32 and torch.equal(x, again.train.features[[5, 0, 17, 30]].float())
    assert torch.equal(y, again.train.labels[[5, 0, 17, 30]])
    assert again.train.dim == tiny.feature_dim


def _rows(digests):
    return np.stack([np.full(16, int(d[1:]) % 1000, np.float16) for d in digests])


def test_compaction_merges_small_shards_and_keeps_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "COMPACT_AT", 4)
    store = shards.ShardStore(tmp_path / "s", 16, np.float16)
    names = [f"d{i}" for i in range(30)]
    for start in range(0, 30, 3):
        store.append(names[start:start + 3], _rows(names[start:start + 3]))
    store.append(names[:2], _rows(names[:2]))  # duplicates (as a concurrent writer may leave) are harmless
    assert len(list((tmp_path / "s").glob("*.npy"))) == 11
    assert store.compact() == 11
    assert len(list((tmp_path / "s").glob("*.npy"))) == 1 and len(store) == 30
    reader = shards.ShardStore(tmp_path / "s", 16, np.float16)  # a new run
    arrays, source, row = reader.lookup(names + ["absent"])
    assert list(source) == [0] * 30 + [-1]
    assert np.array_equal(np.stack([arrays[0][r] for r in row[:30]]), _rows(names))


def _writer(directory, who, count):
    store = shards.ShardStore(directory, 16, np.float16)
    for i in range(count):
        digests = [f"d{who * 100000 + i * 10 + k}" for k in range(10)]
        store.append(digests, _rows(digests))
        if i % 5 == 4:
            store.compact()


def test_concurrent_writers_lose_no_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "COMPACT_AT", 3)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path / "s", who, 30)) for who in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    expected = [f"d{who * 100000 + i}" for who in (1, 2, 3) for i in range(300)]
    arrays, source, row = shards.ShardStore(tmp_path / "s", 16, np.float16).lookup(expected)
    assert (source >= 0).all()
    got = np.stack([arrays[s][r] for s, r in zip(source, row)])
    assert np.array_equal(got, _rows(expected))


def test_old_cache_format_simply_misses(data, tiny, tmp_path, monkeypatch):
    features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    monkeypatch.setattr(feature_store, "CACHE_FORMAT", feature_store.CACHE_FORMAT + 1)
    assert features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET).stats.computed == 24


def test_non_finite_features_are_never_stored(data, tiny, tmp_path):
    class Overflows(nn.Module):
        def forward(self, x):
            return tiny.module(x) * 1e6  # beyond float16's range: inf once stored

    backbone = Backbone(tiny.name, Overflows(), tiny.feature_dim, tiny.preprocessing)
    loaded = features.load_feature_data(data, backbone, cache_dir=tmp_path / "c", **QUIET)
    assert loaded.stats.computed == 24 and not list((tmp_path / "c").rglob("*.npy"))


def test_backbone_stays_on_the_cpu_after_a_cpu_pass(data, tiny, tmp_path):
    features.load_feature_data(data, tiny, use_disk=False, **QUIET)
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in tiny.module.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backbone_leaves_the_gpu_after_the_feature_pass(data, tmp_path):
    backbone = build_backbone("tiny")
    loaded = features.load_feature_data(data, backbone, device="cuda", cache_dir=tmp_path / "c", **QUIET)
    assert all(p.device.type == "cpu" for p in backbone.module.parameters())
    assert torch.cuda.memory_allocated() == 0 and len(loaded.train) == 16


def _cached_in_process(rank, world, port, paths, cache, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        backbone = build_backbone("tiny")
        view = frozen_pass.centre_view(backbone)
        store = feature_store.FeatureStore(cache, backbone)
        result = {"memory": features.cached_features(backbone, paths, view, None, progress=False),
                  "store": features.cached_features(backbone, paths, view, store, progress=False)}
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_write_their_own_shards_and_read_the_union(tmp_path):
    import socket

    import torch.multiprocessing as tmp

    data = make_dataset(tmp_path / "d", TWELVE[:3], per_split={"train": 3})  # 9 images: uneven shares
    (data / "train" / "1" / "broken.jpg").write_text("not a photo")
    paths = [p for p, _ in FlowerFolder(data / "train").samples]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_cached_in_process, args=(2, port, paths, tmp_path / "c", str(tmp_path / "f")), nprocs=2)
    backbone = build_backbone("tiny")
    alone, ok = features.cached_features(backbone, paths, frozen_pass.centre_view(backbone), None, progress=False)
    assert ok.sum() == 9 and not ok.all()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"f.{rank}", weights_only=True)
        for how in ("memory", "store"):
            assert torch.equal(result[how][0], alone) and torch.equal(result[how][1], ok)
    view_dir = _view_dir(tmp_path / "c", backbone)
    assert len({p.name.split("-")[0] for p in view_dir.glob("*.npy")}) == 2  # one writer per process


@pytest.mark.parametrize("arch", ["tiny", "efficientnet_lite0"])
def test_onnx_engine_matches_torch_and_is_cached_apart(arch, tmp_path):
    pytest.importorskip("onnxruntime")
    data = make_dataset(tmp_path / "d", TWELVE[:2], per_split={"train": 2, "valid": 1}, size=(300, 260))
    backbone = build_backbone(arch)
    torch_run = features.load_feature_data(data, backbone, augmented_views=1, cache_dir=tmp_path / "c",
                                           engine="torch", **QUIET)
    onnx_run = features.load_feature_data(data, backbone, augmented_views=1, cache_dir=tmp_path / "c",
                                          engine="onnx", **QUIET)
    assert onnx_run.stats.computed == 10  # its own cache entries, not torch's
    paths = [p for p, _ in FlowerFolder(data / "train").samples]
    view = frozen_pass.centre_view(backbone)
    exact_torch, _ = frozen_pass.extract_features(backbone, paths, view, progress=False)
    exact_onnx, _ = frozen_pass.extract_features(backbone, paths, view, progress=False, engine="onnx")
    assert torch.allclose(exact_onnx, exact_torch, atol=1e-4, rtol=1e-4)
    # Stored as float16 both ways: equal up to that rounding.
    assert torch.allclose(onnx_run.train.features.float(), torch_run.train.features.float(), atol=2e-3, rtol=2e-3)
    again = features.load_feature_data(data, backbone, augmented_views=1, cache_dir=tmp_path / "c",
                                       engine="onnx", **QUIET)
    assert again.stats.cached == 10 and torch.equal(again.train.features, onnx_run.train.features)


def test_onnx_engine_refuses_the_gpu_and_unknown_engines(data, tiny, tmp_path):
    from flower_classifier.errors import UserError

    paths = sorted((data / "train").rglob("*.jpg"))
    with pytest.raises(UserError, match="--engine"):
        frozen_pass.extract_features(tiny, paths, frozen_pass.centre_view(tiny), engine="tensorrt", progress=False)
    features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", **QUIET)
    with pytest.raises(UserError, match="--engine tensorrt"):  # refused even when everything is cached
        features.load_feature_data(data, tiny, cache_dir=tmp_path / "c", engine="tensorrt", **QUIET)
    if torch.cuda.is_available():
        with pytest.raises(UserError, match="--engine onnx"):
            frozen_pass.extract_features(tiny, paths, frozen_pass.centre_view(tiny), engine="onnx", device="cuda",
                                      progress=False)
