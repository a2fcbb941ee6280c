"""Hyperparameter search over cached features: random search, scored on the validation split.

The backbone runs once (features come from the cache), so a trial costs only the head's training:
seconds for 1,280-d features, under a minute for VGG's 25,088-d ones on a CPU. A trial that
fine-tunes the top n blocks (`finetune`) trains them too, on the activations below them, which are
computed once per n and shared by every trial with that n. Trial 0 is the
starting config itself, so the result is never worse (on validation) than what you had. The best
values go to `hyperparameters.json`, which train.py reads for its defaults.

Random rather than grid search: with a handful of parameters that matter unevenly, N random trials
try N distinct values of each (Bergstra & Bengio, 2012), and there is no extra dependency.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from .progress import progress_bar
from .config import FIELDS, TrainConfig
from .files import atomic_write
from .backbones import Backbone, get_spec, split_backbone
from .features import FeatureData, feature_loader
from .devices import threads
from .fitting import fit, fit_threads, loss_weights, make_optimizer, make_scheduler, new_head, seed_everything, \
    trained_model

# The order the values are drawn in (so that a seed gives the same trials); each field's values are
# declared with the field, in `config.TrainConfig`, inside the field's range.
SEARCHED = ("learning_rate", "hidden_units", "dropout", "epochs", "weight_decay", "label_smoothing", "batch_size",
            "finetune", "backbone_lr_factor", "schedule")


def sample_params(rng: random.Random, *, blocks: int | None = None) -> dict:
    """One point of the search space: a choice from a list, or log-uniform in a (low, high) pair.
    `blocks`: the backbone's block count, the most `finetune` can take (`BackboneSpec.num_blocks`)."""
    params = {}
    for name in SEARCHED:
        space = FIELDS[name].metadata["search"]
        if name == "finetune" and blocks is not None:
            space = [n for n in space if n <= blocks]
        if isinstance(space, tuple):
            low, high = math.log10(space[0]), math.log10(space[1])
            params[name] = min(max(float(f"{10 ** rng.uniform(low, high):.3g}"), space[0]), space[1])
        else:
            params[name] = list(rng.choice(space)) if name == "hidden_units" else rng.choice(space)
    return params


def run_trial(data: FeatureData, config: TrainConfig, *, backbone: Backbone | None = None,
              device: torch.device | str = "cpu") -> dict:
    """Train a fresh head (and, with `config.finetune`, fresh copies of the pretrained `backbone`'s top
    blocks) on the cached rows `data` (of `backbones.frozen_part` at that split) with train.py's own
    loop (`training.fit`, no run folder); the metrics of its last epoch."""
    device = torch.device(device)
    seed_everything(config.seed)
    feature_dim = get_spec(config.arch).feature_dim if config.finetune else data.train.dim
    top = torch.nn.Sequential()
    if config.finetune:  # every trial starts from the pretrained blocks: a copy to train
        if backbone is None:
            raise ValueError("a trial that fine-tunes needs the pretrained backbone whose blocks it trains")
        top = split_backbone(dataclasses.replace(backbone, module=copy.deepcopy(backbone.module)), config.finetune)[1]
    head = new_head(config, feature_dim, len(data.classes))
    model = trained_model(config, head, top, backbone).to(device)
    train_loader = feature_loader(data.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    valid_loader = feature_loader(data.valid, batch_size=max(config.batch_size, 256), shuffle=False)
    optimizer = make_optimizer(head, config, top)
    with threads(fit_threads(config, [feature_dim, *config.hidden_units, len(data.classes)], device)):
        state = fit(model, head, train_loader, valid_loader, optimizer, config, device=device, top=top,
                    scheduler=make_scheduler(optimizer, config, len(train_loader)),
                    class_weights=loss_weights(config, data.train.labels, len(data.classes)),
                    log=lambda message: None, progress=False)
    # Scored on the last epoch (not the best one): the epoch count is one of the searched values.
    last = state.history[-1]
    return {"valid_accuracy": last["valid_accuracy"], "valid_loss": last["valid_loss"], "valid_top5": last["valid_top5"]}


def _score(result: dict) -> tuple:
    return (result["valid_accuracy"], -result["valid_loss"])  # ties broken by the lower loss


def random_search(data: Callable[[int], FeatureData], base: TrainConfig, *, trials: int, seed: int = 0,
                  backbone: Backbone | None = None, device: torch.device | str = "cpu", progress: bool = True,
                  log: Callable[[str], None] = print) -> list[dict]:
    """`trials` trials (the first is `base` itself); each {"params", metrics..., "seconds"}, best first.
    `data(n)`: the cached rows below the top n blocks (the features for n = 0), see `rows_per_split`;
    `backbone`: the pretrained one, whose top blocks the trials with `finetune` train copies of."""
    rng = random.Random(seed)
    results = []
    blocks = get_spec(base.arch).num_blocks
    bar = progress_bar(range(trials), desc="search", unit="trial", enabled=progress, leave=True)
    for t in bar:
        params = {k: getattr(base, k) for k in SEARCHED} if t == 0 else sample_params(rng, blocks=blocks)
        params["hidden_units"] = list(params["hidden_units"])
        start = time.perf_counter()
        config = base.replace(**params)
        result = run_trial(data(config.finetune), config, backbone=backbone, device=device)
        results.append({"trial": t, "params": params, **result, "seconds": time.perf_counter() - start})
        best = max(results, key=_score)
        bar.set_postfix(best=f"{100 * best['valid_accuracy']:.1f}%")
        if not progress:
            log(f"trial {t + 1}/{trials}: valid accuracy {100 * result['valid_accuracy']:.1f}%  {params}")
    return sorted(results, key=_score, reverse=True)


def rows_per_split(load: Callable[[int], FeatureData]) -> Callable[[int], FeatureData]:
    """`load(n)` (e.g. `load_feature_data` of `frozen_part(backbone, n)`) once per n, kept for the trials after."""
    loaded: dict[int, FeatureData] = {}

    def data(n: int) -> FeatureData:
        if n not in loaded:
            loaded[n] = load(n)
        return loaded[n]
    return data


def save_best(results: list[dict], base: TrainConfig, path: str | Path, *, data_dir: str | Path) -> dict:
    """Write the best trial's values in the format `config.load_defaults` reads."""
    best = results[0]
    content = {
        "hyperparameters": {**best["params"], "arch": base.arch, "augmented_views": base.augmented_views},
        "valid_accuracy": best["valid_accuracy"],
        "valid_loss": best["valid_loss"],
        "search": {"data_dir": str(data_dir), "trials": len(results), "method": "random",
                   "note": "scored on the validation split; report test accuracy from a separate run"},
        "trials": [{k: r[k] for k in ("trial", "params", "valid_accuracy", "valid_loss", "seconds")}
                   for r in results],
    }
    # Never a half-written defaults file for train.py to trip on.
    atomic_write(path, lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))
    return content

