"""How good is a model, and where does it go wrong: accuracy of a checkpoint on a labelled split, and
a report of per-class precision, recall and F1, the confusion matrix, the most confused pairs and the worst mistakes.

`build_report` is a pure function of the targets and predicted probabilities, so it can be checked on
a known set of predictions; `report_for_model` runs a model over a split to get them; `write_report`
saves the table and the figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import FlowerFolder, eval_transform, make_loader, one_split
from .errors import UserError
from .predictor import load_predictor
from .training import evaluate


def evaluate_checkpoint(checkpoint_path: str | Path, split_path: str | Path, *, device="cpu",
                        batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> dict:
    """Top-1 / top-5 accuracy, image count and unreadable (skipped) images of a checkpoint on a split."""
    predictor = load_predictor(checkpoint_path, device=device, onnx=False)
    dataset = _split_dataset(split_path, predictor)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    metrics = evaluate(predictor.model, loader, torch.device(device), desc="evaluate", progress=progress)
    return {**metrics, "skipped": len(dataset.skipped())}


def _split_dataset(split_path: str | Path, ckpt) -> FlowerFolder:
    """The split's photos in the model's class order (`ckpt`: anything with classes and preprocessing)."""
    # The checkpoint's classes, not the split's own folders: a split may lack categories.
    return FlowerFolder(one_split(split_path), transform=eval_transform(ckpt.preprocessing), classes=ckpt.classes)


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
        return "\n".join(lines)


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


@torch.inference_mode()
def report_for_model(model, dataset: FlowerFolder, *, cat_to_name: dict[str, str] | None = None,
                     device="cpu", batch_size: int = 32, num_workers: int = 0) -> EvaluationReport:
    """Run `model` (images -> logits) over `dataset` (a FlowerFolder) and build the report."""
    loader = make_loader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    targets, probabilities, paths = [], [], []
    for batch in loader:
        if batch is None:  # every image of this batch failed to load (each was warned about)
            continue
        images, labels, indices = batch
        probabilities.append(torch.softmax(model(images.to(device)).float(), dim=1).cpu())  # (N, C)
        targets.append(labels)
        paths += [str(dataset.samples[i][0]) for i in indices.tolist()]
    if not targets:
        raise UserError("no image could be loaded for the report")
    return build_report(torch.cat(targets).numpy(), torch.cat(probabilities).numpy(), dataset.classes,
                        cat_to_name=cat_to_name, paths=paths)


def report_checkpoint(checkpoint_path: str | Path, split_path: str | Path, *, device="cpu",
                      batch_size: int = 32, num_workers: int = 0) -> EvaluationReport:
    """The report of a saved checkpoint on `split_path/<category>/*.jpg`."""
    predictor = load_predictor(checkpoint_path, device=device, onnx=False)
    return report_for_model(predictor.model, _split_dataset(split_path, predictor), cat_to_name=predictor.cat_to_name,
                            device=device, batch_size=batch_size, num_workers=num_workers)


def write_report(report: EvaluationReport, out_dir: str | Path, *, mistakes: int = 8) -> dict[str, Path]:
    """report.txt, per_class.csv and three figures in `out_dir`; returns the paths by kind."""
    import csv

    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table": out / "report.txt", "per_class_csv": out / "per_class.csv",
             "confusion_matrix": out / "confusion_matrix.png",
             "per_class_accuracy": out / "per_class_accuracy.png", "worst_mistakes": out / "worst_mistakes.png"}
    files["table"].write_text(report.table() + "\n")
    with open(files["per_class_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["category", "name", "images", "correct", "precision", "recall", "f1"])
        writer.writeheader()
        writer.writerows(report.per_class())
    plots.plot_confusion_matrix(report, save_to=files["confusion_matrix"])
    plots.plot_per_class_accuracy(report, save_to=files["per_class_accuracy"])
    plots.plot_mistakes(report, limit=mistakes, save_to=files["worst_mistakes"])
    return files
