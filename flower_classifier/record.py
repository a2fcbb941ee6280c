"""What a training run leaves beside its checkpoint, for whoever picks the model up later: the
per-epoch history as a table and a figure, and a model card (data, backbone, config, metrics, weak
spots, limits, how to load it); and, when asked, the same epochs in TensorBoard as they happen.
The file names are the run folder's (`runfolder`)."""
from __future__ import annotations

import csv
import io
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .config import TrainConfig
from .data import find_splits, list_categories, load_split, make_loader
from .datacheck import seen_in_training, split_photos
from .images import list_photos
from .errors import UserError
from .evaluation import EvaluationReport, build_report
from .files import atomic_write
from . import fitting
from .runfolder import RunFolder

# history.csv's columns, in order: what `training.fit` records for each epoch.
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_top5",
                   "learning_rate", "seconds")
WEAK_SPOTS = 5  # classes listed in the card, worst first
FEW_PHOTOS = 20  # training photos per category below which the card warns that the figures are shaky


@dataclass
class Evaluated:
    """The best epoch's figures on one split, and its per-class report."""

    split: str
    accuracy: float
    top5: float
    count: int
    report: EvaluationReport
    leaked: int = 0  # photos of this split that are also (the same bytes) in train or valid


def write_history(history: list[dict], path: str | Path) -> Path:
    """history.csv: one row per epoch (columns HISTORY_COLUMNS; a run from before a column existed leaves it empty)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def write_curves(history: list[dict], path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from . import plots

    fig = plots.plot_history(history)
    try:
        return atomic_write(path, lambda f: plots.save_figure(fig, f))
    finally:
        plt.close(fig)


def split_counts(data_dir: str | Path) -> dict[str, tuple[int, int]]:
    """(photos, categories) of each split of the data folder."""
    return {split: (len(photos), len(list_categories(folder)))
            for (split, photos), folder in zip(split_photos(data_dir).items(), find_splits(data_dir).values())}


def evaluate_on(model: torch.nn.Module, loader, split: str, *, classes: list[str], cat_to_name, device) -> Evaluated:
    """Run `model` (the loader's inputs -> logits) over `loader` (`fitting.evaluate`, the one evaluation
    loop) and report per class."""
    figures = fitting.evaluate(model, loader, device, desc=f"the best epoch on {split}", progress=False, outputs=True)
    probabilities = torch.softmax(figures["logits"], dim=1)  # (N, C)
    report = build_report(figures["targets"].numpy(), probabilities.numpy(), classes, cat_to_name=cat_to_name)
    return Evaluated(split, report.accuracy, figures["top5"], report.count, report)


def record_run(run: RunFolder, *, config: TrainConfig, data_dir, classes: list[str], cat_to_name, history: list[dict],
               head: torch.nn.Module, backbone, valid_model: torch.nn.Module, valid_loader, test: bool, device,
               run_id: str | None, log: Callable[[str], None] = print) -> tuple[list[Path], Evaluated]:
    """At a run's end: the best epoch evaluated on DATA/test (`test`, through the backbone) or else on
    the validation loader (`valid_model`: its inputs -> logits), then its record written in the run
    folder. `head`, `backbone.module` (its fine-tuned blocks) and `valid_model` hold the best epoch's
    weights. Returns the files and the figures."""
    from .model import FlowerClassifier

    if test:
        test_set = load_split(data_dir, "test", backbone.preprocessing, classes=classes)
        loader = make_loader(test_set, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
        evaluated = evaluate_on(FlowerClassifier(backbone.module, head).to(device), loader, "test", classes=classes,
                                cat_to_name=cat_to_name, device=device)
        best = max(history, key=lambda h: h["valid_accuracy"])["epoch"]
        log(f"Test split, best epoch {best}: top-1 accuracy {_pct(evaluated.accuracy)}  top-5 accuracy "
            f"{_pct(evaluated.top5)}  images: {evaluated.count}")
        shared = seen_in_training(split_photos(data_dir).get("test", []), data_dir)
        evaluated.leaked = len(shared)
        if shared:
            log(f"warning: {len(shared)} test photos are the same files as training or validation photos (e.g. "
                f"{shared[0][0]} = {shared[0][1]}): the test figures are optimistic; "
                f"`python -m flower_classifier check-data {data_dir}` lists them")
    else:  # valid_loader's inputs: features or activations on the cached path, images on the classic one
        evaluated = evaluate_on(valid_model, valid_loader, "valid", classes=classes, cat_to_name=cat_to_name, device=device)
    card = model_card(config=config, data_dir=data_dir, classes=classes, cat_to_name=cat_to_name, history=history,
                      evaluated=evaluated, run=run, feature_dim=backbone.feature_dim,
                      preprocessing=backbone.preprocessing, run_id=run_id)
    files = write_record(run, history=history, card=card)
    log(f"Wrote {', '.join(f.name for f in files)} in {run.path}")
    return files, evaluated


# ---------------------------------------------------------------- the model card

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_card(*, config: TrainConfig, data_dir, classes: list[str], cat_to_name,
               history: list[dict], evaluated: Evaluated | None, run: RunFolder, feature_dim: int,
               preprocessing, run_id: str | None) -> str:
    """MODEL_CARD.md's text."""
    from .cli.options import as_flags

    best = max(history, key=lambda h: h["valid_accuracy"])  # the first of equals, as fit keeps it
    counts = split_counts(data_dir)
    name = lambda c: (cat_to_name or {}).get(c, c)  # noqa: E731
    lines = [f"# Model card: {config.arch} + head {list(config.hidden_units)}, {len(classes)} categories", "",
             f"Trained {time.strftime('%Y-%m-%d %H:%M')} with flower_classifier {__version__} (Python "
             f"{platform.python_version()}, torch {torch.__version__}); run id {run_id}. Files: `{run.best.name}` "
             f"(best epoch), `{run.last.name}`, `{run.history.name}`, `{run.curves.name}`.", "",
             "## Data", "",
             f"Folder `{data_dir}`: " + ", ".join(f"{split} {n} photos in {c} categories"
                                                  for split, (n, c) in counts.items()) + ".",
             f"Names: stored in the checkpoint for {sum(c in (cat_to_name or {}) for c in classes)} of the "
             f"{len(classes)} categories" + ("" if cat_to_name else " (category numbers are shown instead)") + ".",
             f"Categories: {', '.join(f'{name(c)} ({c})' if name(c) != c else c for c in classes)}.", "",
             "## Model", "",
             f"- Backbone `{config.arch}`, " + (f"its top {config.finetune} blocks fine-tuned at "
                                                 f"{config.backbone_lr_factor:g} x the head's learning rate, the rest "
                                                 f"frozen ({feature_dim} features per photo), " if config.finetune else
                                                 f"frozen (its weights never change; {feature_dim} features per photo), ")
             + 
             f"its preprocessing: resize to {preprocessing.resize_size}, centre crop {preprocessing.input_size}, "
             f"mean {list(preprocessing.mean)}, std {list(preprocessing.std)}.",
             f"- Head: {' -> '.join(map(str, [feature_dim, *config.hidden_units, len(classes)]))} "
             f"(ReLU, dropout {config.dropout}), trained with AdamW.",
             f"- Training: {_how_trained(config)}.",
             "", "## Config", "",
             f"`train.py {data_dir} --arch {config.arch} {as_flags({k: v for k, v in config.to_dict().items() if k not in ('arch', 'num_workers', 'extra')})}`",
             "", "## Metrics", "",
             f"Best epoch {best['epoch']} of {len(history)} (by validation accuracy; it is the saved "
             f"`{run.best.name}`): validation accuracy {_pct(best['valid_accuracy'])}, top-5 "
             f"{_pct(best.get('valid_top5', float('nan')))}, loss {best['valid_loss']:.4f}."]
    if evaluated and evaluated.split == "test" and evaluated.leaked:
        lines += ["", f"**Test split** ({evaluated.count} photos, of which {evaluated.leaked} are the same files as "
                  f"training or validation photos, so these figures are optimistic; `check-data` lists them): "
                  f"top-1 {_pct(evaluated.accuracy)}, top-5 {_pct(evaluated.top5)}."]
    elif evaluated and evaluated.split == "test":
        lines += ["", f"**Test split** ({evaluated.count} photos, never seen in training nor used to choose the "
                  f"epoch): top-1 {_pct(evaluated.accuracy)}, top-5 {_pct(evaluated.top5)}."]
    else:
        lines += ["", "No test figures: the validation split chose the epoch, so its accuracy is optimistic. "
                  "Train with `--test`, or run `python -m flower_classifier evaluate` on a held-out split."]
    lines += ["", f"Per epoch: `{run.history.name}`, `{run.curves.name}`.", ""]
    if evaluated:
        lines += [f"## Weak spots ({evaluated.split} split, best epoch)", "",
                  f"The categories it gets wrong most often (at most {WEAK_SPOTS}), worst first:", "",
                  "| category | name | photos | accuracy | most often taken for |", "| --- | --- | ---: | ---: | --- |"]
        confusion = evaluated.report.confusion
        # A class's accuracy is its recall: of its photos, the share named right.
        rows = [r for r in evaluated.report.per_class() if r["images"] and r["recall"] < 1]
        if not rows:
            lines.append(f"Every {evaluated.split} photo was named right.")
        for r in sorted(rows, key=lambda r: r["recall"])[:WEAK_SPOTS]:  # stable: category order among equals
            index = classes.index(r["category"])
            wrong = confusion[index].copy()
            wrong[index] = 0
            taken = f"{name(classes[wrong.argmax()])} ({wrong.max()})" if wrong.max() else "-"
            lines.append(f"| {r['category']} | {r['name']} | {r['images']} | {_pct(r['recall'])} | {taken} |")
        lines.append("")
    few = counts.get("train", (0, 1))[0] / max(len(classes), 1)
    lines += ["## Limits", "", _unknown_limit(run, len(classes)),
              f"- The backbone ({config.arch}) is "
              + (f"frozen below its top {config.finetune} blocks" if config.finetune else "frozen")
              + ": it learnt its features from other photos (ImageNet for the pretrained ones), and only the "
              + ("top blocks and the " if config.finetune else "")
              + "head learnt from these, so pictures far from ordinary photos (drawings, microscope images, "
              "night shots) are out of its range.",
              "- Photos are centre-cropped: a flower at the edge of a wide shot may be cut off."]
    if few < FEW_PHOTOS:
        lines.append(f"- Few training photos ({few:.0f} per category on average): each test or validation photo "
                     f"moves the accuracy by several points; treat the figures as rough.")
    if not (evaluated and evaluated.split == "test"):
        lines.append("- Not tested on held-out photos (see Metrics).")
    lines += ["", "## How to use it", "", "```bash",
              f"python predict.py PHOTO.jpg {run.best} --top_k 5",
              f"python -m flower_classifier export {run.best} model.onnx   # one file, runs without torch",
              "```", "", "```python", "import flower_classifier as fc", "",
              f"model, ckpt = fc.load_model({str(run.best)!r})",
              "print(fc.predict(\"PHOTO.jpg\", model, top_k=5).rows())  # [(name, category, probability), ...]",
              "```", ""]
    return "\n".join(lines)


def _unknown_limit(run: RunFolder, species: int) -> str:
    """The card's line on photos of none of the species, from the saved best checkpoint's calibration."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(run.best) if run.best.is_file() else None
    if ckpt is None or ckpt.calibration is None:
        return (f"- It knows only these {species} categories and has no calibration, so any photo, a flower of "
                f"another species or no flower at all, gets one of their names; add the \"unknown\" answer with "
                f"`python -m flower_classifier calibrate`.")
    c = ckpt.calibration
    return (f"- It knows only these {species} categories. A photo unlike them (a flower of another species, or no "
            f"flower at all) gets the answer \"unknown: not one of the {species} species\" instead of a name, when "
            f"its unknown score ({c.method}) is above the threshold {c.threshold:.4g}. The threshold {c.rule}: it "
            f"was tuned to turn away at most about {1 - ckpt.config.keep:.0%} of photos of its own species as unknown "
            f"too, and it catches only the unlike photos that score above it. `predict.py --no_unknown` always names "
            f"the nearest species.")


def _how_trained(config: TrainConfig) -> str:
    if not config.feature_cache:
        return "the classic loop, the backbone on every photo in every epoch"
    if config.finetune:
        return (f"the frozen blocks once per photo view, the top {config.finetune} blocks and the head on their cached "
                f"activations")
    return "the backbone once per photo, the head on its cached features"


def write_record(run: RunFolder, *, history: list[dict], card: str) -> list[Path]:
    """history.csv, training_curves.png and MODEL_CARD.md in the run folder, each written atomically."""
    return [write_history(history, run.history), write_curves(history, run.curves),
            atomic_write(run.card, lambda f: f.write(card.encode()))]


# ---------------------------------------------------------------- TensorBoard

def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed: "
                        "`pip install tensorboard`, or drop --tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    """Each epoch's figures as TensorBoard scalars under `log_dir` (loss/, accuracy/, top5/, ...)."""

    def __init__(self, log_dir: str | Path):
        self.writer = _summary_writer_class()(log_dir=str(log_dir))

    @staticmethod
    def check_installed() -> None:
        """One line now, when the package is missing, rather than after the features are computed."""
        _summary_writer_class()

    def __call__(self, record: dict) -> None:
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch":
                split, _, metric = key.partition("_")  # train_loss -> loss/train; learning_rate stays whole
                tag = f"{metric}/{split}" if split in ("train", "valid") else key
                self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # so that a TensorBoard open beside the run shows each epoch as it ends

    def close(self) -> None:
        self.writer.close()
