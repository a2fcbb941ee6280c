"""Figures: a grid of images, the photo above its top-K bar chart, the training curves, and the
evaluation report's confusion matrix, per-class accuracy and worst mistakes; the reliability diagram
and the unknown score's histograms.

Each function returns the matplotlib figure; with `save_to` it also writes a small PNG and closes the
figure. No function switches matplotlib's backend, so they are safe to call in a notebook.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from .predictor import Prediction, imshow


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, *, dpi: int = 100):
    """Write `fig` as a PNG with a 256-colour palette: photos stay sharp and files stay small.
    `path`: a file name, or a binary file open for writing (`files.atomic_write`'s)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    buffer.seek(0)
    if not hasattr(path, "write"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buffer) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG",
                                                                                    optimize=True)
    return path


def _finish(fig, save_to: str | Path | None, dpi: int = 100):
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to, dpi=dpi)
        _pyplot().close(fig)
    return fig


def plot_image_grid(images, titles: list[str], preprocessing, *, ncols: int = 4, save_to=None):
    """Processed image tensors (N, 3, S, S) shown as photos (normalization undone), each with a title."""
    plt = _pyplot()
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.7 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        imshow(image, preprocessing, ax=ax, title=title)
    return _finish(fig, save_to)


def plot_prediction(image, prediction: Prediction, *, title: str | None = None, save_to: str | Path | None = None):
    """The photo (with `title`, e.g. the true name) above a horizontal bar chart of the top-K names."""
    import seaborn as sns

    from .data import load_image

    plt = _pyplot()
    photo = image if hasattr(image, "size") else load_image(image)
    fig, (ax_img, ax_bar) = plt.subplots(2, 1, figsize=(5, 8), gridspec_kw={"height_ratios": [3, 2]})
    ax_img.imshow(photo)
    ax_img.axis("off")
    ax_img.set_title(title or prediction.names[0])
    sns.barplot(x=prediction.probabilities, y=prediction.names, ax=ax_bar, color=sns.color_palette()[0],
                orient="h")
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    return _finish(fig, save_to)


def plot_history(history: list[dict], *, save_to: str | Path | None = None):
    """Training and validation loss, and accuracy (validation; training too when recorded), per
    epoch, with the best epoch by validation accuracy marked."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="training")
    ax_loss.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    if all("train_accuracy" in h for h in history):
        ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], marker="o", color="C0", label="training")
    ax_acc.plot(epochs, [100 * h["valid_accuracy"] for h in history], marker="o", color="C2", label="validation")
    best = max(history, key=lambda h: h["valid_accuracy"])  # the first of equals, as training keeps it
    ax_acc.axvline(best["epoch"], color="grey", linestyle=":", label=f"best: epoch {best['epoch']}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    if len(epochs) <= 20:  # whole epochs only
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(epochs)
    return _finish(fig, save_to)


# ---------------------------------------------------------------- the evaluation report

def plot_confusion_matrix(report, *, save_to=None):
    """Heatmap of counts (row: true class, column: predicted); names on the axes up to 30 classes."""
    import seaborn as sns

    plt = _pyplot()
    n = len(report.classes)
    labels = report.names if n <= 30 else report.classes
    side = min(max(4.0, 0.45 * n + 2), 22.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    sns.heatmap(report.confusion, annot=n <= 20, fmt="d", cmap="Blues", square=True, cbar=n > 20,
                cbar_kws={"shrink": 0.5}, xticklabels=labels, yticklabels=labels, ax=ax, linewidths=0.5 if n <= 30 else 0)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_title(f"Confusion matrix: {report.count} images, accuracy {100 * report.accuracy:.1f}%")
    if n > 30:
        ax.tick_params(labelsize=5)
    return _finish(fig, save_to)


def plot_per_class_accuracy(report, *, save_to=None):
    """Horizontal bars of per-class accuracy, worst first, with each class's image count."""
    import seaborn as sns

    plt = _pyplot()
    rows = sorted((r for r in report.per_class() if r["images"]), key=lambda r: r["recall"])
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.28 * len(rows)))
    labels = [f"{r['name']} ({r['images']})" for r in rows]
    sns.barplot(x=[100 * r["recall"] for r in rows], y=labels, ax=ax, color=sns.color_palette()[0], orient="h")
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy = recall (%)")
    ax.set_title("Per-class accuracy (images)")
    if len(rows) > 40:
        ax.tick_params(axis="y", labelsize=6)
    return _finish(fig, save_to)


def plot_mistakes(report, *, limit: int = 8, ncols: int = 4, save_to=None):
    """The most confident wrong predictions: each photo with its true and predicted names."""
    from .data import load_image

    plt = _pyplot()
    shown = [m for m in report.mistakes if m.path][:limit]
    if not shown:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
        return _finish(fig, save_to)
    ncols = min(ncols, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, shown):
        photo = load_image(m.path)
        photo.thumbnail((224, 224))
        ax.imshow(photo)
        ax.set_title(f"true: {report.names[m.true]}\nsaid: {report.names[m.predicted]} ({100 * m.confidence:.0f}%)",
                     fontsize=9)
    fig.suptitle("Most confident mistakes")
    return _finish(fig, save_to, dpi=80)  # photos make big PNGs


# ---------------------------------------------------------------- calibration and the unknown answer

def plot_reliability(before, after, *, save_to=None):
    """calibration.png: accuracy against confidence per bin (`calibration.Reliability`, before and after
    temperature scaling)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, bins, title in zip(axes, (before, after), ("before", "after temperature scaling")):
        # One narrow bar per bin (accuracy) and a red tick at the bin's mean confidence: the gap between
        # them is the miscalibration, and no bar is drawn over another (stacked gaps overlapped).
        shown = bins.counts > 0
        centres = (bins.edges[:-1] + bins.edges[1:])[shown] / 2
        width = 0.8 * np.diff(bins.edges)[shown]
        accuracy, confidence = bins.accuracy[shown], bins.confidence[shown]
        ax.bar(centres, accuracy, width=width, color="tab:blue", edgecolor="black", linewidth=0.5,
               label="accuracy in the bin")
        ax.vlines(centres, np.minimum(accuracy, confidence), np.maximum(accuracy, confidence),
                  color="tab:red", linewidth=1)
        ax.scatter(centres, confidence, marker="_", s=120, color="tab:red", linewidths=2, zorder=3,
                   label="mean confidence in the bin")
        for x, acc, n in zip(centres, accuracy, bins.counts[shown]):
            ax.text(x, 0.02, str(int(n)), ha="center", fontsize=7, color="white" if acc > 0.06 else "dimgray")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               title=f"{title}: ECE {100 * bins.ece:.1f}%")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8, framealpha=1)
    fig.text(0.5, -0.02, "numbers at the foot of a bar: photos in that bin", ha="center", fontsize=8, color="dimgray")
    return _finish(fig, save_to)


def plot_score_histograms(species_scores, negative_scores, threshold: float, *,
                          method: str = "", save_to=None):
    """The unknown score of species photos and of photos that are none of them, with the threshold."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    both = np.concatenate([np.ravel(species_scores), np.ravel(negative_scores), [threshold]])
    edges = np.linspace(both.min(), both.max(), 31)
    ax.hist(species_scores, bins=edges, alpha=0.6, label=f"species photos ({len(species_scores)})")
    ax.hist(negative_scores, bins=edges, alpha=0.6, label=f"not the species ({len(negative_scores)})")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold: above it, unknown")
    ax.set(xlabel=f"unknown score ({method})" if method else "unknown score", ylabel="photos")
    ax.legend()
    return _finish(fig, save_to)
