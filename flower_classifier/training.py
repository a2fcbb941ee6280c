"""Training the head: `train_one_epoch`, `evaluate`, `fit` (epochs, logging, best/last saves), and
`run_training`, which sets everything up from a config and a data directory.

Randomness of epoch k is seeded from (seed, k) alone (shuffle and augmentation through
`data.EpochSampler`, dropout through torch's seed), so a run resumed after epoch k continues
exactly as the uninterrupted run would have: no random-number state needs saving.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from .progress import progress_bar
from . import devices, distributed
from .backbones import Backbone, build_backbone, frozen_part, get_spec, split_backbone, too_many_blocks
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .devices import check_device
from .data import epoch_seed, find_classes, load_split, make_loader, skipped_images, split_dir
from .errors import Interrupted, UserError
from .model import FlowerClassifier, TunedHead, build_head
from .names import as_category_names, check_names
from .runfolder import Resumed, RunFolder, interrupts_deferred, load_resume, new_run_id

if TYPE_CHECKING:
    from .record import Evaluated  # record imports evaluation, which imports this module


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
             desc: str = "eval", progress: bool = True) -> dict:
    """Mean loss, top-1 and top-5 accuracy (fractions) and the image count over `loader`."""
    model.eval()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    total_loss, top1, top5, count = 0.0, 0, 0, 0
    for batch in _progress(loader, desc, progress):
        if batch is None:
            continue
        inputs, targets = batch[0].to(device), batch[1].to(device)
        logits = model(inputs)
        total_loss += loss_fn(logits, targets).item() * len(targets)
        hits = topk_correct(logits, targets)
        top1, top5, count = top1 + hits[1], top5 + hits[5], count + len(targets)
    if count == 0:
        raise UserError("no image could be loaded for evaluation")
    return {"loss": total_loss / count, "accuracy": top1 / count, "top5": top5 / count, "count": count}


WORK_PER_THREAD = 5e8  # multiply-adds per step a thread is worth; below it one thread is fastest (measured)


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
        log(f"Epoch {epoch}/{config.epochs}  train loss {tr['loss']:.4f}  valid loss {va['loss']:.4f}  "
            f"valid accuracy {100 * va['accuracy']:.1f}%  ({seconds:.1f} s){'  *best' if improved else ''}")
        if on_epoch is not None:
            on_epoch(record)
        with interrupts_deferred():  # the epoch's files and `state.epoch` change together
            if run is not None and distributed.is_main():  # under torchrun every process holds the same head
                snapshot = dataclasses.replace(template, head_state=head.state_dict(), top_state=top_state(top),
                                               epoch=epoch, metrics={k: v for k, v in record.items() if k != "epoch"},
                                               history=list(state.history))
                run.save_epoch(snapshot, improved=improved, optimizer_state=optimizer.state_dict(),
                               scheduler_state=None if scheduler is None else scheduler.state_dict(),
                               best_accuracy=state.best_accuracy)
            state.epoch = epoch  # only now is the epoch done (and saved)
    return state


def top_state(top: nn.Module | None) -> dict:
    """What a checkpoint keeps of the fine-tuned blocks: their state_dict ({} for a frozen backbone)."""
    return {} if top is None else top.state_dict()


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    state: FitState
    classes: list[str]
    epochs_run: int = 0  # epochs trained by this call (0: a resumed run that had already finished)
    record: list[Path] = field(default_factory=list)  # history.csv, training_curves.png, MODEL_CARD.md (`record`)
    evaluated: "Evaluated | None" = None  # the best epoch on the test split (test=True), else on valid


def run_training(config: TrainConfig, data_dir: str | Path, *, save_dir: str | Path = "checkpoints",
                 device: torch.device | str = "cpu", cat_to_name: dict[str, str] | str | Path | None = None,
                 resume: str | Path | bool | None = None, backbone: Backbone | None = None,
                 cache_dir: str | Path | None = None, negatives: str | Path | None = None,
                 log: Callable[[str], None] = print, progress: bool = True, test: bool = False,
                 tensorboard: str | Path | None = None) -> TrainResult:
    """Load data, build the frozen backbone and a new head, train, keep best and last checkpoints.

    With `config.feature_cache` (the default) the backbone runs once per image and the head trains on
    the stored features (see `features`, which caches them under `cache_dir`); otherwise every epoch
    runs the backbone on freshly augmented images (the classic loop). Under torchrun (see
    `distributed`) the cached path splits the work between the processes.

    `device`: one this machine has (`select_device(gpu=True)` picks one, or the CPU). `cat_to_name`:
    a dict or a JSON file's path. `resume`: a last.pth or its folder, or True for `save_dir`. The run
    holds `save_dir`'s lock throughout (see `runfolder`): a second run into it is refused. Once the
    epochs are done, the best and last checkpoints are calibrated (see `calibrating`), with the photos
    of `negatives` (none of the species) when given. At the end the run folder gets its record
    (`record`): history, curves and model card, with the best epoch's figures on DATA/test when
    `test`. `tensorboard`: a folder for TensorBoard's event files.
    """
    device = check_device(device)
    from .frozen_pass import resolve_engine

    # What runs the feature pass, recorded as resolved: the classic loop runs PyTorch every epoch.
    config = config.replace(engine=resolve_engine(config.engine, device) if config.feature_cache else "torch")
    seed_everything(config.seed)
    # Everything that can be refused is checked before weights are downloaded or features computed.
    check_finetune(config)
    train_dir, _ = split_dir(data_dir, "train"), split_dir(data_dir, "valid")
    if test:
        split_dir(data_dir, "test")
    from .record import TensorBoardLog  # here: record imports evaluation, which imports this module
    if tensorboard is not None:
        TensorBoardLog.check_installed()
    if distributed.world_size() > 1 and not config.feature_cache:
        raise UserError("--classic runs in one process; drop --classic to train under torchrun")
    classes = find_classes(train_dir)
    if negatives is not None:
        from .calibrating import negative_photos

        negative_photos(negatives)
    cat_to_name = as_category_names(cat_to_name)
    if cat_to_name is not None:
        check_names(cat_to_name, Path(data_dir), classes, log)
    run = RunFolder(save_dir)
    # Under torchrun only the main process writes, so it alone holds the lock.
    with run.locked(log) if distributed.is_main() else contextlib.nullcontext():
        resumed = None
        if resume is not None and resume is not False:
            resumed = load_resume(save_dir if resume is True else resume, config, classes)
            if distributed.is_main():
                run.restore_best(resumed, log)
            done = resumed.state["epoch"]
            if done >= config.epochs:
                log(f"{resumed.path} already finished {done} of {config.epochs} epochs; nothing to train "
                    f"(raise --epochs to train more)")
                return TrainResult(run.best, run.last, FitState.restored(resumed.state), classes)
            log(f"Resuming from {resumed.path} after epoch {done}")
        board = TensorBoardLog(tensorboard) if tensorboard is not None and distributed.is_main() else None
        try:
            return _train(config, data_dir, run, resumed, device=device, cat_to_name=cat_to_name, backbone=backbone,
                          cache_dir=cache_dir, negatives=negatives, log=log, progress=progress, test=test, on_epoch=board)
        finally:
            if board is not None:
                board.close()


def check_finetune(config: TrainConfig) -> None:
    """--arch is known and has the --finetune blocks asked for (shapes only: nothing is built)."""
    spec = get_spec(config.arch)
    if config.finetune and config.finetune > spec.num_blocks:  # a frozen run needs no shapes worked out
        raise too_many_blocks(config.arch, config.finetune, spec.num_blocks)


def _train(config: TrainConfig, data_dir, run: RunFolder, resumed: Resumed | None, *, device, cat_to_name,
           backbone, cache_dir, negatives, log, progress, test, on_epoch) -> TrainResult:
    """run_training's work once every check has passed and the run folder is locked."""
    backbone = backbone or build_backbone(config.arch)
    if config.finetune:  # training changes the top blocks: work on a copy, leaving the caller's backbone as it was
        backbone = dataclasses.replace(backbone, module=copy.deepcopy(backbone.module))
    frozen, top = split_for_training(backbone, config.finetune)
    if config.feature_cache:
        from .features import cached_training_data  # only the cached path needs it

        # Rows of what the frozen part gives: the features, or the activations below the top blocks.
        train_loader, valid_loader, classes, engine = cached_training_data(
            config, data_dir, frozen, device=device, log=log, progress=progress,
            cache_dir=cache_dir)
        config = config.replace(engine=engine)  # torch where the backbone could not be exported
        train_labels = train_loader.dataset.labels  # the images that decoded, each view counted
    else:
        train_set = load_split(data_dir, "train", backbone.preprocessing, augment=config.augment)
        classes = train_set.classes
        train_labels = torch.tensor([label for _, label in train_set.samples])
        valid_set = load_split(data_dir, "valid", backbone.preprocessing, classes=classes)
        pin = device.type == "cuda"
        train_loader = make_loader(train_set, batch_size=config.batch_size, shuffle=True,
                                   num_workers=config.num_workers, seed=config.seed, pin_memory=pin)
        valid_loader = make_loader(valid_set, batch_size=config.batch_size, shuffle=False,
                                   num_workers=config.num_workers, pin_memory=pin)

    torch.manual_seed(config.seed)  # the head's initial weights do not depend on how the data was set up
    head = build_head(backbone.feature_dim, config.hidden_units, len(classes), config.dropout)
    model = trained_model(config, head, top, backbone)
    model.to(device)  # before the optimizer, so that resumed optimizer state lands on the same device
    optimizer = make_optimizer(head, config, top)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    template = Checkpoint(arch=config.arch, preprocessing=backbone.preprocessing, head_state={},
                          classes=classes, config=config, cat_to_name=cat_to_name,
                          run_id=resumed.last.run_id if resumed else new_run_id())
    state = FitState()
    if resumed is not None:
        state = _restore(resumed, run, head, top, optimizer, scheduler, config, log)
    first_epoch = state.epoch
    model = distributed.wrap(model, device)  # after resume: every process starts from the same weights
    how = ("cached activations" if config.finetune else "cached features") if config.feature_cache \
        else "images (classic loop)"
    what = f"top {config.finetune} blocks + head" if config.finetune else "head"
    procs = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    log(f"Training {config.arch} {what} {list(config.hidden_units)} on {len(classes)} categories, "
        f"{len(train_loader.dataset)} training / {len(valid_loader.dataset)} validation {how}, "
        f"on {device}{procs}")
    small = config.feature_cache and not config.finetune and device.type == "cpu"  # a head alone: threads by its size
    try:
        with devices.threads(head_threads([backbone.feature_dim, *config.hidden_units, len(classes)],
                                          config.batch_size) if small else None):
            state = fit(model, head, train_loader, valid_loader, optimizer, config, device=device, top=top,
                        scheduler=scheduler, state=state, run=run, template=template,
                        class_weights=loss_weights(config, train_labels, len(classes)),
                        log=log, progress=progress, on_epoch=on_epoch)
    except KeyboardInterrupt:
        if state.epoch:
            log(f"interrupted: epochs 1-{state.epoch} are saved in {run.path}; continue with the same command "
                f"plus --resume")
        else:
            log("interrupted: no epoch had finished, so nothing is saved; run the same command again")
        raise Interrupted() from None
    finally:
        skipped = skipped_images(train_loader.dataset, valid_loader.dataset)
        if skipped:
            log(f"skipped {len(skipped)} unreadable images (each named in a warning above)")
    if config.feature_cache:  # the rows training used, one per photo (its centre crop)
        splits = {name: loader.dataset.centre_crops() for name, loader in (("train", train_loader),
                                                                            ("valid", valid_loader))}
    else:
        splits = None
    calibrate_run(run, config, data_dir, classes, frozen, top, negatives=negatives, cache_dir=cache_dir, device=device,
                  log=log, progress=progress, splits=splits, skip=skipped)
    result = TrainResult(run.best, run.last, state, classes, state.epoch - first_epoch)
    if distributed.is_main():
        from .record import record_run

        # The run ends on the last epoch's weights; the record is of the best epoch's head and blocks.
        load_weights(load_checkpoint(run.best), head, top)
        result.record, result.evaluated = record_run(
            run, config=config, data_dir=data_dir, classes=classes, cat_to_name=cat_to_name, history=state.history,
            head=head, backbone=backbone, valid_model=trained_model(config, head, top, backbone).to(device),
            valid_loader=valid_loader, test=test, device=device, run_id=template.run_id, log=log)
    return result


def split_for_training(backbone: Backbone, n: int) -> tuple[Backbone, nn.Module]:
    """(the frozen part whose outputs the cache holds, the top n blocks that train: `backbone`'s own
    modules). n = 0: the backbone as it is, whatever its module, and an empty top."""
    if not n:
        return backbone, nn.Sequential()
    return frozen_part(backbone, n), split_backbone(backbone, n)[1]


def trained_model(config: TrainConfig, head: nn.Module, top: nn.Module, backbone: Backbone) -> nn.Module:
    """What maps the loaders' inputs to logits: the head on cached features; the top blocks and the head
    on cached activations (`--finetune`); the whole network on images (--classic)."""
    if not config.feature_cache:
        return FlowerClassifier(backbone.module, head)  # the top's parameters, and only they, want gradients
    if config.finetune:
        return TunedHead(top, head, get_spec(config.arch).split_shapes[config.finetune])
    return head


def load_weights(ckpt: Checkpoint, head: nn.Module, top: nn.Module) -> None:
    """A checkpoint's head and fine-tuned blocks into `head` and `top` (`split_backbone`'s)."""
    head.load_state_dict(ckpt.head_state)
    if ckpt.top_state:
        top.load_state_dict(ckpt.top_state)


def _restore(resumed: Resumed, run: RunFolder, head, top, optimizer, scheduler, config: TrainConfig, log) -> FitState:
    """A resumed run's weights, optimizer (every parameter group) and schedule, from its training state."""
    saved = resumed.state
    head.load_state_dict(saved["head_state"])  # its shapes were checked by load_resume
    if config.finetune:
        top.load_state_dict(saved["top_state"])  # checked by load_resume too
    try:
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot resume: the optimizer state in {run.state.name} beside {resumed.path} does not "
                        f"fit this model ({type(e).__name__}); train again without --resume") from None
    if scheduler is not None and resumed.last.config.epochs != config.epochs:
        log(f"note: --epochs {config.epochs} (saved run: {resumed.last.config.epochs}): the {config.schedule} "
            f"schedule continues on the curve of {config.epochs} epochs")
    return FitState.restored(saved)


def calibrate_run(run: RunFolder, config: TrainConfig, data_dir, classes: list[str], frozen: Backbone,
                  top: nn.Module, *, negatives=None, cache_dir=None, device="cpu",
                  log: Callable[[str], None] = print, progress: bool = True, splits: dict | None = None,
                  skip=()) -> None:
    """Calibrate the run's best and last checkpoints (each its own head and blocks, so its own
    temperature) on the data folder (or the train/valid rows `splits` already at hand, as the frozen
    part gives them; `skip`: photos found unreadable), and rewrite them (atomically) with it.
    `frozen`, `top`: the run's `split_for_training`; each checkpoint's blocks are loaded into `top`.
    Under torchrun every process helps compute the rows; the main process writes."""
    from .calibrating import calibrate_checkpoint, calibration_data, describe

    data = calibration_data(data_dir, classes, frozen, negatives=negatives,
                            cache_dir=cache_dir, device=device, num_workers=config.num_workers, progress=progress,
                            engine=getattr(config, "engine", "torch"), splits=splits, skip=skip)
    if not distributed.is_main():
        return
    for path in (run.best, run.last):
        ckpt = load_checkpoint(path)
        ckpt.calibration, seen = calibrate_checkpoint(ckpt, classes, data, method=config.unknown_score,
                                                       keep=config.keep, top=top, device=device)
        save_checkpoint(ckpt, path)
        if path == run.best:
            log(describe(ckpt.calibration, seen))
