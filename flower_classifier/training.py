"""A training run, top to bottom: `run_training` checks what it is given, then takes the run through
its stages, each a module that imports only those below it:

    photos -> frozen features (`features`, the store)  -> head (and top blocks) fit (`fitting`)
           -> calibration of the best epoch (`calibrating`) -> the run's files (`runfolder`, `record`)

The run is done when its best checkpoint is calibrated and its record written; a run stopped before
that (Ctrl-C, a kill) is finished by `--resume`, which trains only the epochs still missing.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import calibrating, devices, distributed
from .backbones import Backbone, build_backbone, get_spec, split_for_training, too_many_blocks
from .checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from .config import TrainConfig
from .devices import check_device
from .data import find_classes, load_split, make_loader, skipped_images, split_dir
from .datacheck import negative_photos
from .errors import Interrupted, UserError
from .features import cached_training_data
# The loop's names are the notebook's too: `from flower_classifier.training import train_one_epoch, ...`.
from .fitting import (FitState, evaluate, fit, fit_threads, loss_weights, make_optimizer, make_scheduler,  # noqa: F401
                      new_head, seed_epoch, seed_everything, train_one_epoch, trained_model)
from .frozen_pass import resolve_engine
from .model import build_head  # noqa: F401  (the notebook's name)
from .names import as_category_names, check_names
from .record import Evaluated, TensorBoardLog, record_run
from .runfolder import Resumed, RunFolder, load_resume, new_run_id


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    state: FitState
    classes: list[str]
    epochs_run: int = 0  # epochs trained by this call (0: a resumed run that had already finished)
    record: list[Path] = field(default_factory=list)  # history.csv, training_curves.png, MODEL_CARD.md (`record`)
    evaluated: Evaluated | None = None  # the best epoch on the test split (test=True), else on valid


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
    epochs are done, the best checkpoint is calibrated (see `calibrating`), with the photos of
    `negatives` (none of the species) when given; last.pth, what --resume continues, is not. Then the run folder gets its record
    (`record`): history, curves and model card, with the best epoch's figures on DATA/test when
    `test`. `tensorboard`: a folder for TensorBoard's event files.
    """
    device = check_device(device)
    # What runs the feature pass, recorded as resolved: the classic loop runs PyTorch every epoch.
    config = config.replace(engine=resolve_engine(config.engine, device) if config.feature_cache else "torch")
    seed_everything(config.seed)
    # Everything that can be refused is checked before weights are downloaded or features computed.
    check_finetune(config)
    train_dir, _ = split_dir(data_dir, "train"), split_dir(data_dir, "valid")
    if test:
        split_dir(data_dir, "test")
    if tensorboard is not None:
        TensorBoardLog.check_installed()
    if distributed.world_size() > 1 and not config.feature_cache:
        raise UserError("--classic runs in one process; drop --classic to train under torchrun")
    classes = find_classes(train_dir)
    if negatives is not None:
        negative_photos(negatives, data_dir=data_dir)
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
            missing = run.unfinished(len(resumed.state["history"]))  # every process: all of them finish it together
            if done >= config.epochs and not missing:
                log(f"{resumed.path} already finished {done} of {config.epochs} epochs; nothing to train "
                    f"(raise --epochs to train more)")
                return TrainResult(run.best, run.last, FitState.restored(resumed.state), classes)
            if done >= config.epochs:
                log(f"{resumed.path} finished its {done} epochs but was stopped before {' and '.join(missing)}; "
                    f"finishing it")
            else:
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

    head = new_head(config, backbone.feature_dim, len(classes))
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
    try:
        with devices.threads(fit_threads(config, [backbone.feature_dim, *config.hidden_units, len(classes)], device)):
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
    result = TrainResult(run.best, run.last, state, classes, state.epoch - first_epoch)
    try:
        best = finish(run, state, template, config=config, data_dir=data_dir, classes=classes, frozen=frozen, top=top,
                      train_loader=train_loader, valid_loader=valid_loader, skipped=skipped, negatives=negatives,
                      cache_dir=cache_dir, device=device, log=log, progress=progress, retrained=result.epochs_run > 0)
        if distributed.is_main():
            # The run ends on the last epoch's weights; the record is of the best epoch's head and blocks.
            load_weights(best, head, top)
            result.record, result.evaluated = record_run(
                run, config=config, data_dir=data_dir, classes=classes, cat_to_name=cat_to_name, history=state.history,
                head=head, backbone=backbone, valid_model=trained_model(config, head, top, backbone).to(device),
                valid_loader=valid_loader, test=test, device=device, run_id=template.run_id, log=log)
    except KeyboardInterrupt:
        log(f"interrupted after training: the {state.epoch} epochs are saved in {run.path}, but {run.best.name} is not "
            f"calibrated or the run's record not written yet; finish it with the same command plus --resume")
        raise Interrupted() from None
    return result


def finish(run: RunFolder, state: FitState, template: Checkpoint, *, config: TrainConfig, data_dir, classes: list[str],
           frozen: Backbone, top: nn.Module, train_loader, valid_loader, skipped, negatives, cache_dir, device,
           log: Callable[[str], None], progress: bool, retrained: bool) -> Checkpoint:
    """The best epoch's checkpoint, calibrated and saved (once, by the main process): from the weights
    `fit` kept, or the run folder's best file when this call did not train it. A best file already
    calibrated by this score is kept as it is unless this call trained epochs. Every process helps
    compute the calibration's rows and train its fold heads (under torchrun)."""
    if state.best is not None:
        epoch, head_state, top_state = state.best
        best = dataclasses.replace(template, head_state=head_state, top_state=top_state, epoch=epoch,
                                   metrics={k: v for k, v in state.history[epoch - 1].items() if k != "epoch"},
                                   history=list(state.history[:epoch]))
    else:
        best = load_checkpoint(run.best)
    if not retrained and best.calibration is not None and best.calibration.method == config.unknown_score:
        return best
    splits = views = None
    if config.feature_cache:  # the rows training used: one per photo (its centre crop), and the augmented views
        splits = {name: loader.dataset.centre_crops() for name, loader in (("train", train_loader),
                                                                            ("valid", valid_loader))}
        rows, centre = train_loader.dataset.rows, train_loader.dataset.centre
        # Augmented views come in whole passes over the photos; one that lost a photo the centre crop kept
        # (a file that changed meanwhile) leaves the fold heads on centre crops only.
        if len(rows) > centre and (len(rows) - centre) % centre == 0:
            views = rows.take(np.arange(centre, len(rows))).astype(np.float32)
    data = calibrating.calibration_data(data_dir, classes, frozen, negatives=negatives, cache_dir=cache_dir,
                                        device=device, num_workers=config.num_workers, progress=progress,
                                        engine=config.engine, splits=splits, skip=skipped, views=views)
    best.calibration, seen = calibrating.calibrate_checkpoint(best, classes, data, method=config.unknown_score,
                                                              keep=config.keep, top=top, device=device)
    if distributed.is_main():
        save_checkpoint(best, run.best)
        log(calibrating.calibrated_line(best.calibration, seen, classes, finetune=config.finetune))
    return best


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
