"""The loop that fits a head: `train_one_epoch` and `evaluate` (plain functions returning metric
dicts), the optimizer, the learning-rate schedule, and `fit`, which runs the epochs, logs, and saves
`last` and `best` in a run folder. Every head that is trained goes through it: train.py's (with or
without fine-tuned blocks, on cached rows or on images), `search`'s trials, and calibration's fold
heads (`calibrating`).

Randomness of epoch k is seeded from (seed, k) alone (shuffle and augmentation through
`data.EpochSampler`, dropout through torch's seed), so a run resumed after epoch k continues
exactly as the uninterrupted run would have: no random-number state needs saving.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .progress import progress_bar
from . import devices, distributed
from .backbones import Backbone, get_spec
from .checkpoint import Checkpoint
from .config import TrainConfig
from .data import epoch_seed
from .errors import UserError
from .model import FlowerClassifier, TunedHead, build_head
from .runfolder import RunFolder, interrupts_deferred


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(train_loader, seed: int, epoch: int) -> None:
    """Make epoch `epoch`'s randomness a function of (seed, epoch) alone, whatever ran before."""
    torch.manual_seed(epoch_seed(seed, epoch))  # dropout, augmentation in the main process
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(epoch_seed(seed, epoch))  # worker seeds
    if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
        # This epoch's order and per-image augmentation seeds, the same in every torchrun process.
        train_loader.sampler.set_epoch(epoch)


def _progress(loader, desc: str, enabled: bool):
    return progress_bar(loader, desc=desc, unit="batch", enabled=enabled)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    device: torch.device, *, scheduler=None, desc: str = "train", progress: bool = True) -> dict:
    """One pass over `loader`, stepping `optimizer` (and `scheduler`, per batch). Returns mean loss and accuracy."""
    model.train()
    total_loss, correct, count = 0.0, 0, 0
    for batch in _progress(loader, desc, progress):
        if batch is None:  # every image of this batch failed to load (each was warned about)
            continue
        inputs, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(inputs)  # (N, num_classes)
        loss = loss_fn(logits, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):  # stop before the step spreads nan into the weights
            raise diverged(desc, loss_value, optimizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss_value * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    # Under torchrun each process saw its share: the epoch's figures are those of all the shares.
    total_loss, correct, count = distributed.sum_over_processes(total_loss, correct, count)
    if count == 0:
        raise UserError("no training image could be loaded; check the data with "
                        "`python -m flower_classifier check-data DATA`")
    return {"loss": total_loss / count, "accuracy": correct / count, "count": int(count)}


def diverged(desc: str, loss: float, optimizer: torch.optim.Optimizer) -> UserError:
    """The one line for a loss that is no longer a finite number, naming the likely causes."""
    lr = optimizer.param_groups[0]["lr"]
    return UserError(f"{desc}: the loss became {loss} (not a finite number), so training stopped, leaving the saved "
                     f"checkpoints as they were; the learning rate {lr:g} is likely too high (try --learning_rate "
                     f"{lr / 10:g}), or the data holds broken values (`python -m flower_classifier check-data DATA`)")


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many targets are among the k highest logits, for each k (capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hits = top == targets[:, None]
    return {k: int(hits[:, :min(k, kmax)].any(1).sum()) for k in ks}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, *, loss_fn: nn.Module | None = None,
             desc: str = "eval", progress: bool = True, outputs: bool = False,
             forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> dict:
    """Mean loss, top-1 and top-5 accuracy (fractions) and the image count over `loader`: the one loop
    over evaluation batches (validation, the record's test split, the `evaluate` and `report` commands).

    `forward(inputs)` -> (logits (N, C), features (N, D) or None): how the outputs are got (default:
    `model(inputs)` and no features), e.g. the backbone's features and the head, or test-time views.
    With `outputs`, also, on the CPU: every row's "logits" (N, C) and "targets" (N,), "features"
    (N, D) when `forward` gives them, and "indices" (N,) when the loader's batches carry each row's
    index in its dataset (a third item). Rows with a negative target (photos of none of the species)
    are in the outputs only: the figures are of the others (None where there are none)."""
    model.eval()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    forward = forward or (lambda inputs: (model(inputs), None))
    total_loss, top1, top5, count, rows = 0.0, 0, 0, 0, 0
    kept = {"logits": [], "targets": [], "features": [], "indices": []}
    for batch in _progress(loader, desc, progress):
        if batch is None:  # every image of this batch failed to load (each was warned about)
            continue
        inputs, targets = batch[0].to(device), batch[1].to(device)
        logits, features = forward(inputs)  # (N, C), (N, D) or None
        known = targets >= 0
        if known.any():
            total_loss += loss_fn(logits[known], targets[known]).item() * int(known.sum())
            hits = topk_correct(logits[known], targets[known])
            top1, top5, count = top1 + hits[1], top5 + hits[5], count + int(known.sum())
        rows += len(targets)
        if outputs:
            kept["logits"].append(logits.float().cpu())
            kept["targets"].append(targets.cpu())
            if features is not None:
                kept["features"].append(features.float().cpu())
            if len(batch) > 2:
                kept["indices"].append(torch.as_tensor(batch[2]))
    if rows == 0:
        raise UserError(f"{desc}: no image could be loaded")
    figures = ({"loss": total_loss / count, "accuracy": top1 / count, "top5": top5 / count} if count
               else {"loss": None, "accuracy": None, "top5": None})
    figures["count"] = count
    if outputs:
        figures.update({name: torch.cat(parts) for name, parts in kept.items() if parts})
    return figures


WORK_PER_THREAD = 5e8  # multiply-adds per step a thread is worth; below it one thread is fastest (measured)


def new_head(config: TrainConfig, in_features: int, num_classes: int, *, seed: int | None = None) -> nn.Sequential:
    """A fresh head as train.py draws it: its initial weights from `config.seed` (or `seed`) alone,
    whatever ran before (data set-up, other heads)."""
    torch.manual_seed(config.seed if seed is None else seed)
    return build_head(in_features, config.hidden_units, num_classes, config.dropout)


def fit_threads(config: TrainConfig, dims: list[int], device: torch.device, *, heads: int = 1) -> int | None:
    """Threads for fitting: a head alone (on cached features, on the CPU) by its size (`head_threads`;
    `heads` trained at once count as that many times the work); else None, torch's own choice."""
    if not config.feature_cache or config.finetune or torch.device(device).type != "cpu":
        return None
    return head_threads(dims, config.batch_size * heads)


def trained_model(config: TrainConfig, head: nn.Module, top: nn.Module, backbone: Backbone) -> nn.Module:
    """What maps the loaders' inputs to logits: the head on cached features; the top blocks and the head
    on cached activations (`--finetune`); the whole network on images (--classic)."""
    if not config.feature_cache:
        return FlowerClassifier(backbone.module, head)  # the top's parameters, and only they, want gradients
    if config.finetune:
        return TunedHead(top, head, get_spec(config.arch).split_shapes[config.finetune])
    return head


def head_threads(dims: list[int], batch_size: int) -> int:
    """Threads for training a head of layer widths `dims` (features ... classes): the user's --threads,
    else one per WORK_PER_THREAD of a step's work, at most the cores. A 2-core machine trained
    EfficientNet's head (1280-512-102) 10x faster on 1 thread than on 2 (README, Training speed)."""
    work = batch_size * sum(a * b for a, b in zip(dims, dims[1:]))
    return devices.chosen_threads() or max(1, min(devices.cpu_cores(), int(work // WORK_PER_THREAD)))


def loss_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The training loss's weight per class for `config.class_weights`: None for "none"; for "balanced",
    n / (C * n_c) from the training `labels` (n of them, C classes, n_c of class c), scikit-learn's
    "balanced" rule: each class then weighs the same in the loss, however many images it has. A
    function of the data alone, so a resumed run recomputes the same weights."""
    if config.class_weights == "none":
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    # A training split has every class (empty categories are refused); clamp keeps a stray 0 finite.
    return (len(labels) / (num_classes * counts.clamp(min=1))).float()


def make_optimizer(head: nn.Module, config: TrainConfig, top: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over the head's parameters and, when fine-tuning, the top blocks' (a second group, at the
    head's rate times `config.backbone_lr_factor`). The frozen backbone is never seen by the optimizer."""
    groups = [{"params": list(head.parameters())}]
    tuned = [p for p in top.parameters() if p.requires_grad] if top is not None else []
    if tuned:
        groups.append({"params": tuned, "lr": config.learning_rate * config.backbone_lr_factor})
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


ONECYCLE_START, ONECYCLE_WARMUP, COSINE_WARMUP = 1 / 25, 0.25, 0.05  # torch's OneCycleLR's start; warm-up shares


def lr_multiplier(schedule: str, step: int, total: int) -> float:
    """The learning rate of step `step` (0-based) of `total`, as a share of the configured rate (each
    parameter group's own, so the blocks keep their factor): constant; onecycle, a linear rise from
    1/25 over the first quarter, then half a cosine down to 0; cosine, a linear rise over the first
    twentieth, then the same fall."""
    if schedule == "constant" or total <= 1:
        return 1.0
    warm = max(1, round(total * (ONECYCLE_WARMUP if schedule == "onecycle" else COSINE_WARMUP)))
    if step < warm:
        start = ONECYCLE_START if schedule == "onecycle" else 0.0
        return start + (1 - start) * (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / (total - warm)))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The per-batch schedule of `config.schedule` over `config.epochs` epochs of `steps_per_epoch`
    (None for constant). Its state goes into the training state, so that --resume continues the curve."""
    if config.schedule == "constant":
        return None
    total = config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(config.schedule, step, total))


def early_stop(history: list[dict], patience: int) -> str | None:
    """Why training stops now (`--patience`: that many epochs without a lower validation loss), or None."""
    if not patience or not history:
        return None
    best = min(history, key=lambda h: h["valid_loss"])  # the first of equals
    waited = history[-1]["epoch"] - best["epoch"]
    if waited < patience:
        return None
    return (f"Early stop: the validation loss has not improved for {waited} epochs (best {best['valid_loss']:.4f} "
            f"at epoch {best['epoch']}; --patience {patience})")


@dataclass
class FitState:
    """Where a run stands: finished epochs' metrics and the best validation accuracy so far."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_accuracy: float = -1.0
    # The best epoch's weights, kept by `fit` when it trains that epoch: (epoch, head state, top state).
    # None after a resume that has not beaten the saved best: it is then in the run folder's best file.
    best: tuple[int, dict, dict] | None = None

    @classmethod
    def restored(cls, saved: dict) -> "FitState":
        """From a training-state file (`checkpoint.load_training_state`)."""
        return cls(epoch=saved["epoch"], history=list(saved["history"]), best_accuracy=saved["best_metric"])


def fit(model: nn.Module, head: nn.Module, train_loader, valid_loader, optimizer, config: TrainConfig, *,
        device: torch.device, top: nn.Module | None = None, scheduler=None,
        state: FitState | None = None, run: RunFolder | None = None,
        template: Checkpoint | None = None, class_weights: torch.Tensor | None = None,
        log: Callable[[str], None] = print, progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None) -> FitState:
    """Train for the remaining epochs of `config.epochs`, validating after each; with a `run` folder,
    save each epoch there as `last` and (if better) `best`. The one loop of train.py and `search`.

    `model` maps the loaders' inputs to logits (backbone+head on images, or the head on cached
    features, or `model.TunedHead` on cached activations); `head` and the fine-tuned `top` blocks
    (`--finetune`) are the parts that are saved. `scheduler` is stepped per batch. `template` carries
    what the checkpoint needs besides those weights. With `config.patience`, training stops early (see
    `early_stop`). `class_weights` (see `loss_weights`) weigh the training loss only.
    `on_epoch(record)` sees each epoch's figures (TensorBoard, say).
    """
    state = state or FitState()
    weights = None if class_weights is None else class_weights.to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    # The validation loss stays unweighted: the loss on the validation split as it is, so that runs
    # with and without class weights (and search's trials) are compared on the same measure.
    valid_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        stop = early_stop(state.history, config.patience)
        if stop:
            log(stop)
            break
        start = time.perf_counter()
        seed_epoch(train_loader, config.seed, epoch)
        desc = f"epoch {epoch}/{config.epochs}"
        tr = train_one_epoch(model, train_loader, optimizer, loss_fn, device, scheduler=scheduler,
                             desc=f"{desc} train", progress=progress)
        va = evaluate(model, valid_loader, device, loss_fn=valid_loss_fn, desc=f"{desc} valid", progress=progress)
        if not math.isfinite(va["loss"]):  # the last step broke the weights: nothing of it is saved
            raise diverged(f"{desc} valid", va["loss"], optimizer)
        seconds = time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                  "valid_loss": va["loss"], "valid_accuracy": va["accuracy"], "valid_top5": va["top5"],
                  "learning_rate": optimizer.param_groups[0]["lr"], "seconds": seconds}
        state.history.append(record)
        improved = va["accuracy"] > state.best_accuracy
        if improved:
            state.best_accuracy = va["accuracy"]
            state.best = (epoch, _copy(head.state_dict()), _copy(blocks_state(top)))
        log(f"Epoch {epoch}/{config.epochs}  train loss {tr['loss']:.4f}  valid loss {va['loss']:.4f}  "
            f"valid accuracy {100 * va['accuracy']:.1f}%  ({seconds:.1f} s){'  *best' if improved else ''}")
        if on_epoch is not None:
            on_epoch(record)
        with interrupts_deferred():  # the epoch's files and `state.epoch` change together
            if run is not None and distributed.is_main():  # under torchrun every process holds the same head
                snapshot = dataclasses.replace(template, head_state=head.state_dict(), top_state=blocks_state(top),
                                               epoch=epoch, metrics={k: v for k, v in record.items() if k != "epoch"},
                                               history=list(state.history))
                run.save_epoch(snapshot, improved=improved, optimizer_state=optimizer.state_dict(),
                               scheduler_state=None if scheduler is None else scheduler.state_dict(),
                               best_accuracy=state.best_accuracy)
            state.epoch = epoch  # only now is the epoch done (and saved)
    return state


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def blocks_state(top: nn.Module | None) -> dict:
    """What a checkpoint keeps of the fine-tuned blocks: their state_dict ({} for a frozen backbone)."""
    return {} if top is None else top.state_dict()
