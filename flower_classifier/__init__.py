"""Name a flower's species from a photo: a frozen pretrained CNN with a new trainable head.

Modules in the order data flows through them (README *Code map*): `config` (every option, once)
-> `data` / `images` (photo folders, decoding, preprocessing) -> `backbones` -> `features` /
`shards` (the frozen pass, computed once, and its store) -> `model` (the head) -> `training` /
`search` / `distributed` -> `runfolder` (a save folder: files, saving, resuming, the lock) and
`record` (the history, curves and model card a run leaves there) -> `checkpoint` / `files` ->
`calibration` / `calibrating` -> `predictor` (a checkpoint or an ONNX file, one interface) ->
`export` / `serving`; `evaluation` and `plots` measure; `cli` and `notebook` are the faces (the
notebook's out-of-order checks in `tutorial`, its keep-awake helpers in `workspace`); `names`,
`devices`, `progress`, `errors`, `datacheck`, `oxford102` serve them.

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
    "extract_features": "features", "load_feature_data": "features",
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
