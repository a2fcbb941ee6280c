"""How good is a model, and where does it go wrong: accuracy of a checkpoint on a labelled split, and
a report of per-class precision, recall and F1, the confusion matrix, the most confused pairs and the worst mistakes;
with a calibrated checkpoint, the calibration error before and after temperature scaling and, given a
folder of photos that are none of the species (`negatives`), how well "unknown" separates them.

`build_report` is a pure function of the targets and predicted probabilities, so it can be checked on
a known set of predictions; `report_for_model` runs a model over a split to get them; `write_report`
saves the table and the figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import calibration as cal, unknown
from .datacheck import negative_photos
from .data import FlowerFolder, PhotoList, eval_transform, make_loader, one_split
from .predictor import average_views, load_predictor
from .fitting import evaluate


@dataclass
class Outputs:
    """What a model gives on a set of photos: logits (N, C), backbone features (N, D), targets (N,)
    and the photos' paths, for the photos that could be read; and `fitting.evaluate`'s figures."""

    logits: np.ndarray
    features: np.ndarray
    targets: np.ndarray
    paths: list[str]
    figures: dict = field(default_factory=dict)


def model_outputs(model, dataset: PhotoList, *, device="cpu", batch_size: int = 32, num_workers: int = 0,
                  what: str = "the split", progress: bool = False, tta: bool = False) -> Outputs:
    """Run `model` (a FlowerClassifier) over `dataset` through the one evaluation loop
    (`fitting.evaluate`): one pass gives all that evaluation needs. `tta`: outputs averaged over
    each photo's views, as prediction does (`predictor.average_views`)."""
    loader = make_loader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (N, 3, S, S) -> logits (N, C), features (N, D)
        f = model.features(torch.from_numpy(images).to(device))
        return model.head(f).float().cpu().numpy(), f.float().cpu().numpy()

    def forward(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not tta:  # stays in torch; the views' average is prediction's own numpy code
            features = model.features(inputs)
            return model.head(features).float(), features.float()
        logits, features = average_views(run, inputs.cpu().numpy())
        return torch.from_numpy(logits).to(inputs.device), torch.from_numpy(features)

    figures = evaluate(model, loader, device, desc=f"evaluate {what}", progress=progress, outputs=True, forward=forward)
    outputs = {name: figures.pop(name).numpy() for name in ("logits", "features", "targets", "indices")}
    return Outputs(outputs["logits"], outputs["features"], outputs["targets"],
                   [str(dataset.samples[i][0]) for i in outputs["indices"].tolist()], figures)


def negatives_dataset(folder: str | Path, predictor) -> PhotoList:
    """The photos of a folder that are none of the species, as `predictor`'s model sees them (target -1)."""
    return PhotoList([(p, -1) for p in negative_photos(folder)], eval_transform(predictor.preprocessing))


def calibration_figures(outputs: Outputs, calibration: cal.Calibration | None,
                        negatives: Outputs | None = None) -> dict:
    """ECE before / after temperature scaling (with the noise floor of as many photos) and, with
    negatives, `calibration.detection_metrics` and both kinds' scores."""
    before = cal.softmax(outputs.logits)
    after = (calibration or cal.Calibration()).probabilities(outputs.logits)
    figures = {"ece_before": cal.expected_calibration_error(before, outputs.targets),
               "ece_after": cal.expected_calibration_error(after, outputs.targets),
               "ece_floor": cal.ece_noise_floor(after),
               "reliability": (cal.reliability(before, outputs.targets), cal.reliability(after, outputs.targets))}
    if negatives is not None and calibration is not None:
        species = calibration.scores(outputs.logits, outputs.features)
        others = calibration.scores(negatives.logits, negatives.features)
        correct = outputs.logits.argmax(1) == outputs.targets
        figures["unknown"] = {**unknown.detection_metrics(species, correct, others, calibration.threshold),
                              "species_scores": species, "negative_scores": others, "negatives": len(others),
                              "threshold": calibration.threshold, "method": calibration.method}
    return figures


def evaluate_checkpoint(checkpoint_path: str | Path, split_path: str | Path, *, device="cpu",
                        batch_size: int = 32, num_workers: int = 0, negatives: str | Path | None = None,
                        progress: bool = True, tta: bool = False) -> dict:
    """Top-1 / top-5 accuracy, loss, image count and unreadable (skipped) images of a checkpoint on a
    split, its calibration figures (`calibration_figures`) and whether it is calibrated; `tta`: of
    the outputs averaged over each photo's views, as `predict --tta` gives them."""
    predictor = load_predictor(checkpoint_path, device=device, onnx=False)
    negative_set = negatives_dataset(negatives, predictor) if negatives is not None else None
    dataset = split_dataset(split_path, predictor)
    common = dict(device=device, batch_size=batch_size, num_workers=num_workers, progress=progress, tta=tta)
    out = model_outputs(predictor.model, dataset, **common)
    other = model_outputs(predictor.model, negative_set, what=str(negatives), **common) if negative_set else None
    return {**out.figures, "skipped": len(dataset.skipped()),
            "calibrated": predictor.calibration is not None,
            **calibration_figures(out, predictor.calibration, other)}


def split_dataset(split_path: str | Path, predictor) -> FlowerFolder:
    """The split's photos in the model's class order (`predictor`: anything with classes and preprocessing)."""
    # The checkpoint's classes, not the split's own folders: a split may lack categories.
    return FlowerFolder(one_split(split_path), transform=eval_transform(predictor.preprocessing),
                        classes=predictor.classes)


# ---------------------------------------------------------------- the report

@dataclass
class Mistake:
    path: str
    true: int  # class index
    predicted: int
    confidence: float  # the probability given to the wrong class


@dataclass
class EvaluationReport:
    classes: list[str]  # class index -> category folder name
    names: list[str]  # class index -> flower name (the category when no name is known)
    confusion: np.ndarray  # (C, C) counts: row = true class, column = predicted class
    mistakes: list[Mistake]  # every wrong prediction, most confident first
    calibration: dict = field(default_factory=dict)  # `calibration_figures`, when the model's outputs are known

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.count, 1))

    def per_class(self) -> list[dict]:
        """Per class: category, name, images, correct, precision (of the images predicted as the class,
        the share that are), recall (of the class's images, the share found: its accuracy) and F1 (their
        harmonic mean, 2TP / (2TP + FP + FN)); None where undefined: recall for a class without images,
        precision for one never predicted, F1 for one that is neither."""
        rows = []
        for i, (category, name) in enumerate(zip(self.classes, self.names)):
            correct = int(self.confusion[i, i])
            total, predicted = int(self.confusion[i].sum()), int(self.confusion[:, i].sum())  # row, column
            rows.append({"category": category, "name": name, "images": total, "correct": correct,
                         "precision": correct / predicted if predicted else None,
                         "recall": correct / total if total else None,
                         # 0 for a class with images that is never predicted: missing it is a failure.
                         "f1": 2 * correct / (total + predicted) if total + predicted else None})
        return rows

    @property
    def macro_f1(self) -> float | None:
        """The mean of the per-class F1 over the classes where it is defined: every class counts the
        same, however many images it has (accuracy is dominated by the large ones)."""
        scores = [r["f1"] for r in self.per_class() if r["f1"] is not None]
        return sum(scores) / len(scores) if scores else None

    def confused_pairs(self, top: int = 10) -> list[dict]:
        """Off-diagonal cells with at least one image, largest first: true class mistaken for predicted."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        true_idx, pred_idx = np.nonzero(off)
        pairs = sorted(zip(true_idx.tolist(), pred_idx.tolist()), key=lambda tp: (-off[tp], tp))
        return [{"true": self.names[t], "predicted": self.names[p], "count": int(off[t, p]),
                 "share": float(off[t, p] / self.confusion[t].sum())} for t, p in pairs[:top]]

    def table(self, top: int = 10) -> str:
        """Plain text: overall accuracy and macro F1, per-class precision, recall and F1 (worst recall
        first), the most confused pairs."""
        width = max([len(n) for n in self.names] + [10])
        percent = lambda value: "-" if value is None else f"{100 * value:.1f}%"  # noqa: E731
        lines = [f"accuracy {100 * self.accuracy:.1f}% on {self.count} images, {len(self.mistakes)} wrong, "
                 f"macro F1 {percent(self.macro_f1)}", "",
                 f"{'category':>8}  {'name':<{width}}  {'images':>6}  {'correct':>7}  {'precision':>9}  {'recall':>6}  "
                 f"{'F1':>6}"]
        rows = sorted(self.per_class(), key=lambda r: (r["recall"] is None, r["recall"] or 0))
        for r in rows:
            lines.append(f"{r['category']:>8}  {r['name']:<{width}}  {r['images']:>6}  {r['correct']:>7}  "
                         f"{percent(r['precision']):>9}  {percent(r['recall']):>6}  {percent(r['f1']):>6}")
        pairs = self.confused_pairs(top)
        lines += ["", "most confused (true -> predicted):" if pairs else "no confusions"]
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']} ({100 * p['share']:.0f}% of {p['true']})"
                  for p in pairs]
        if self.calibration:
            lines += ["", *calibration_lines(self.calibration)]
        return "\n".join(lines)


def calibration_lines(figures: dict) -> list[str]:
    """ECE and, with negatives, the unknown answer's figures: what `evaluate` and the report print."""
    lines = [f"calibration error (ECE, {cal.ECE_BINS} bins): {100 * figures['ece_before']:.1f}% before, "
             f"{100 * figures['ece_after']:.1f}% after temperature scaling (a perfectly calibrated model shows about "
             f"{100 * figures['ece_floor']:.1f}% on this many photos)"]
    u = figures.get("unknown")
    if u:
        lines.append(f"unknown ({u['method']} score, threshold {u['threshold']:.4g}): AUROC species vs not-species "
                     f"{u['auroc']:.4f}; not-species caught {100 * u['negatives_caught']:.1f}% of {u['negatives']}; "
                     f"species wrongly called unknown {100 * u['species_rejected']:.1f}%; accuracy on accepted species "
                     f"{100 * u['accepted_accuracy']:.1f}% (all species {100 * u['accuracy']:.1f}%)")
    return lines


def build_report(targets, probabilities, classes: list[str], *, cat_to_name: dict[str, str] | None = None,
                 paths: list[str] | None = None) -> EvaluationReport:
    """The report for known targets (N,) and predicted probabilities (N, C)."""
    targets = np.asarray(targets, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    size = len(classes)
    confusion = np.zeros((size, size), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    paths = list(paths) if paths is not None else [""] * len(targets)
    wrong = np.nonzero(predicted != targets)[0]
    mistakes = [Mistake(str(paths[i]), int(targets[i]), int(predicted[i]), float(confidence[i])) for i in wrong]
    mistakes.sort(key=lambda m: -m.confidence)
    names = [(cat_to_name or {}).get(c, c) for c in classes]
    return EvaluationReport(list(classes), names, confusion, mistakes)


class _Indexed(Dataset):
    """A dataset's items with their index, so that predictions can be matched back to files."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (*item, i)


def report_for_model(model, dataset: FlowerFolder, *, cat_to_name: dict[str, str] | None = None,
                     device="cpu", batch_size: int = 32, num_workers: int = 0,
                     negatives: PhotoList | None = None, tta: bool = False) -> EvaluationReport:
    """Run `model` (a FlowerClassifier, calibrated when it has a `calibration`) over `dataset` (a
    FlowerFolder), and over `negatives` when given, and build the report with calibrated probabilities
    (`tta`: see `model_outputs`)."""
    common = dict(device=device, batch_size=batch_size, num_workers=num_workers, tta=tta)
    out = model_outputs(model, dataset, **common)
    other = model_outputs(model, negatives, what="the negatives", **common) if negatives is not None else None
    calibration = getattr(model, "calibration", None)
    report = build_report(out.targets, (calibration or cal.Calibration()).probabilities(out.logits), dataset.classes,
                          cat_to_name=cat_to_name, paths=out.paths)
    report.calibration = calibration_figures(out, calibration, other)
    return report


def report_checkpoint(checkpoint_path: str | Path, split_path: str | Path, *, device="cpu",
                      batch_size: int = 32, num_workers: int = 0,
                      negatives: str | Path | None = None, tta: bool = False) -> EvaluationReport:
    """The report of a saved checkpoint on `split_path/<category>/*.jpg` (and the photos of `negatives`)."""
    predictor = load_predictor(checkpoint_path, device=device, onnx=False)
    negative_set = negatives_dataset(negatives, predictor) if negatives is not None else None
    return report_for_model(predictor.model, split_dataset(split_path, predictor), cat_to_name=predictor.cat_to_name,
                            device=device, batch_size=batch_size, num_workers=num_workers, negatives=negative_set,
                            tta=tta)


# What `write_report` writes into its folder, by kind (the last two only with calibration / negatives).
REPORT_FILES = {"table": "report.txt", "per_class_csv": "per_class.csv", "confusion_matrix": "confusion_matrix.png",
                "per_class_accuracy": "per_class_accuracy.png", "worst_mistakes": "worst_mistakes.png",
                "calibration": "calibration.png", "unknown_scores": "unknown_scores.png"}


def write_report(report: EvaluationReport, out_dir: str | Path, *, mistakes: int = 8) -> dict[str, Path]:
    """report.txt, per_class.csv and three figures in `out_dir`, and with the model's outputs
    calibration.png (reliability diagram) and, with negatives, unknown_scores.png; returns the paths by kind."""
    import csv

    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / REPORT_FILES[kind] for kind in ("table", "per_class_csv", "confusion_matrix",
                                                         "per_class_accuracy", "worst_mistakes")}
    files["table"].write_text(report.table() + "\n")
    with open(files["per_class_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["category", "name", "images", "correct", "precision", "recall", "f1"])
        writer.writeheader()
        writer.writerows(report.per_class())
    plots.plot_confusion_matrix(report, save_to=files["confusion_matrix"])
    plots.plot_per_class_accuracy(report, save_to=files["per_class_accuracy"])
    plots.plot_mistakes(report, limit=mistakes, save_to=files["worst_mistakes"])
    if report.calibration:
        files["calibration"] = out / REPORT_FILES["calibration"]
        plots.plot_reliability(*report.calibration["reliability"], save_to=files["calibration"])
    if report.calibration.get("unknown"):
        u = report.calibration["unknown"]
        files["unknown_scores"] = out / REPORT_FILES["unknown_scores"]
        plots.plot_score_histograms(u["species_scores"], u["negative_scores"], u["threshold"], method=u["method"],
                                  save_to=files["unknown_scores"])
    return files
