"""Checkpoint -> one self-contained ONNX file: backbone + head, giving logits and the backbone's
features, with the category list, flower names, preprocessing and calibration (temperature, unknown
score and threshold) in its metadata, so that `predictor.OnnxPredictor` needs nothing else.

Uses torch's TorchScript-based exporter (`dynamo=False`): it works offline with no extra package,
and handles every backbone here. The file is written beside the target and renamed into place
(`files.atomic_write`).
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .files import atomic_write, check_output, head
from .frozen_pass import OPSET
from .predictor import ONNX_FORMAT, ONNX_FORMAT_VERSION, load_predictor



def _is_export(path: Path) -> bool:
    """Whether `path` is an earlier export: its ONNX producer field, which comes right after the
    format version at the start of the file (protobuf writes fields in number order)."""
    return b"\x12\x11flower_classifier" in head(path, 32)


class WithFeatures(nn.Module):
    """The classifier giving its logits and the backbone's features: what `calibration.assess` needs
    for calibrated probabilities and the unknown score, computed by the same code as for a checkpoint."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(images)  # (N, 3, S, S) -> (N, D)
        return self.model.head(features), features  # (N, num_classes), (N, D)


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = OPSET, overwrite: bool = False) -> Path:
    """Write `out` (.onnx) from `checkpoint`; returns its path. Input `image` (N, 3, S, S) float32,
    normalized; outputs `logits` (N, num_classes) and `features` (N, D). An existing `out` is
    replaced only when it is an earlier export or with `overwrite` (see `files.check_output`)."""
    try:
        import onnx
    except ImportError:
        raise UserError("exporting needs the onnx package: `pip install onnx`") from None
    if not isinstance(checkpoint, (str, Path)):
        raise UserError(f"export_onnx takes the checkpoint file's path (got a {type(checkpoint).__name__}); "
                        f"save the model with save_checkpoint first")
    out = Path(out)
    if out.suffix.lower() != ".onnx" and not out.is_dir():  # predict.py and serve tell ONNX files by this suffix
        raise UserError(f"{out}: an exported model's name must end in .onnx, e.g. {out.with_suffix('.onnx')}")
    # Before any work; a typo never makes folders.
    check_output(out, inputs=[checkpoint], overwrite=overwrite, ours=_is_export, example="model.onnx")
    predictor = load_predictor(checkpoint, onnx=False)  # refuses a checkpoint with broken weights
    size = predictor.preprocessing.input_size
    buffer = io.BytesIO()
    fused_attention = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # ViT's fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
            torch.onnx.export(WithFeatures(predictor.model), (torch.zeros(1, 3, size, size),), buffer, dynamo=False,
                              input_names=["image"], output_names=["logits", "features"], opset_version=opset,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fused_attention)
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "arch": predictor.arch,
        "classes": json.dumps(predictor.classes),
        "cat_to_name": json.dumps(predictor.cat_to_name),
        "preprocessing": json.dumps(predictor.preprocessing.to_dict()),
        "calibration": json.dumps(predictor.calibration.to_dict() if predictor.calibration else None,
                                  separators=(",", ":")),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "flower_classifier"
    onnx.checker.check_model(proto)
    # < 2 GB for every backbone here, so the weights stay inside the one file.
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    return out
