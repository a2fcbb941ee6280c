"""Name a flower's species from a photo: a frozen pretrained CNN with a new trainable head.

Modules in the order data flows through them, each importing only those before it (README *Code
map*): `config` (every option, once) -> `data` / `images` / `datacheck` (photo folders, decoding,
preprocessing, the look-over) -> `backbones` / `blocks` -> `shards` / `feature_store` (the store)
-> `frozen_pass` (the frozen pass, computed once) -> `features` (rows found or computed; the
datasets a head trains on) -> `model` (the head) -> `unknown` (the unknown scores and thresholds, numpy
only) -> `calibration` (temperature, ECE, the stored `Calibration`) -> `checkpoint` / `files` ->
`runfolder` (a save folder: files, saving an epoch, resuming, the lock) -> `fitting` (the one loop:
`train_one_epoch`, `evaluate`, `fit`), with `search` and `distributed` -> `calibrating` (a head's
calibration: its fold heads go through `fitting`) -> `predictor` (a checkpoint or an ONNX file, one
interface) -> `evaluation` / `plots` (measuring) -> `record` (history, curves, model card) ->
`training` (`run_training`: the run, stage after stage) -> `export` / `serving`; `cli` and
`notebook` are the faces (the notebook's out-of-order checks in `tutorial`, its keep-awake helpers
in `workspace`); `names`, `hub`, `devices`, `progress`, `errors`, `oxford102` serve them.

Names below are imported on first use, so `flower_classifier.cli` and light tools (such as ONNX
inference) start without importing torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BACKBONES": "backbones", "Backbone": "backbones", "Preprocessing": "images", "build_backbone": "backbones",
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "TrainConfig": "config",
    "extract_features": "frozen_pass", "load_feature_data": "features",
    "UserError": "errors",
    "FlowerClassifier": "model", "build_head": "model", "count_parameters": "model",
    "Prediction": "predictor", "imshow": "predictor", "predict": "predictor", "process_image": "predictor",
    "load_predictor": "predictor", "Predictor": "predictor",
    "read_category_names": "names", "select_device": "devices",
    "run_training": "training", "TrainResult": "training",
    "evaluate_checkpoint": "evaluation", "export_onnx": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
