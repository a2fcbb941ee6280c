"""Figures: the photo beside its top-K bar chart, and the training curves."""
from __future__ import annotations

from pathlib import Path

from .prediction import Prediction


def plot_prediction(image, prediction: Prediction, *, title: str | None = None, save_to: str | Path | None = None):
    """The photo (with `title`, e.g. the true name) above a horizontal bar chart of the top-K names."""
    import matplotlib

    if save_to is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .data import load_image

    photo = image if hasattr(image, "size") else load_image(image)
    fig, (ax_img, ax_bar) = plt.subplots(2, 1, figsize=(5, 8), gridspec_kw={"height_ratios": [3, 2]})
    ax_img.imshow(photo)
    ax_img.axis("off")
    ax_img.set_title(title or prediction.names[0])
    sns.barplot(x=prediction.probabilities, y=prediction.names, ax=ax_bar, color=sns.color_palette()[0],
                orient="h")
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=100)
        plt.close(fig)
    return fig


def plot_history(history: list[dict], *, save_to: str | Path | None = None):
    """Training and validation loss, and validation accuracy, per epoch."""
    import matplotlib

    if save_to is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="training")
    ax_loss.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["valid_accuracy"] for h in history], marker="o", color="C2")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=100)
        plt.close(fig)
    return fig
