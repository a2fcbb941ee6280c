"""Does fine-tuning help the unknown answer with flowers of other species? Leave one species out,
with whole training runs of a recipe, and score what each run's own checkpoint answers.

    python bench/bench_unknown_recipe.py ../shared/data/flower_photos_2k --negatives ../shared/data/not_flowers \
        --recipes plain best --cache_dir /tmp/acc2/cache --work_dir /tmp/lsoft

For each species in turn, a folder of the other species (links, all three splits) is trained as
`train.py --recipe R` trains it, so the checkpoint's own calibration (its unknown score, fitted on
fine-tuned features when the recipe fine-tunes, and its threshold) is what is measured. Then, at
that threshold: the held-out species' photos (all its splits) called unknown, the negatives called
unknown, the known species' test photos kept; AUROC of the held-out species and of the negatives
against the known test photos, for the checkpoint's score and for energy and the largest logit
(after its temperature). `bench_unknown.py --leave_species_out` surveys many scores on one frozen
head's cached outputs; this one measures what a user's run gives, fine-tuned blocks included, so it
trains for real (about one `--recipe best` run per species: minutes each on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from flower_classifier import evaluation, unknown  # noqa: E402
from flower_classifier.cli import main as cli_main  # noqa: E402
from flower_classifier.checkpoint import load_checkpoint  # noqa: E402
from flower_classifier.config import RECIPES, TrainConfig  # noqa: E402
from flower_classifier.data import PhotoList, eval_transform, find_classes, split_dir  # noqa: E402
from flower_classifier.datacheck import negative_photos  # noqa: E402
from flower_classifier.images import list_photos  # noqa: E402
from flower_classifier.predictor import load_predictor  # noqa: E402
from flower_classifier.training import run_training  # noqa: E402

SPLITS = ("train", "valid", "test")
FIGURES = ("own kept", "other caught", "negatives caught", "AUROC other", "AUROC negatives",
           "AUROC other, energy", "AUROC other, max logit", "test top-1")


def without(data: Path, held: str, folder: Path) -> Path:
    """`folder` made (once) as `data` without the species `held`: a link per species and split."""
    for split in SPLITS:
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name in find_classes(data / split):
            if name != held and not (folder / split / name).exists():
                os.symlink((data / split / name).resolve(), folder / split / name)
    return folder


def outputs(checkpoint: Path, known: Path, held_photos: list[Path], negatives: Path) -> tuple:
    """The run's model outputs (logits, features) of the known species' test photos, of the held-out
    species' photos and of the negatives: one pass over them, whichever calibration scores them."""
    predictor = load_predictor(checkpoint)
    other_set = PhotoList([(p, -1) for p in held_photos], eval_transform(predictor.preprocessing))
    return tuple(evaluation.model_outputs(predictor.model, dataset) for dataset in
                 (evaluation.split_dataset(known / "test", predictor), other_set,
                  evaluation.negatives_dataset(negatives, predictor)))


def measure(outputs_of_run: tuple, cal) -> dict:
    """The figures of one calibration `cal` on the run's `outputs`."""
    own, other, neg = outputs_of_run
    s_own, s_other, s_neg = (cal.scores(o.logits, o.features) for o in (own, other, neg))
    correct = own.logits.argmax(1) == own.targets
    versus_other, versus_neg = (unknown.detection_metrics(s_own, correct, s, cal.threshold) for s in (s_other, s_neg))
    by_logits = {m: [unknown.logit_score(m, o.logits, cal.temperature) for o in (own, other)]
                 for m in ("energy", "max_logit")}
    return {"own kept": 1 - versus_other["species_rejected"], "other caught": versus_other["negatives_caught"],
            "negatives caught": versus_neg["negatives_caught"],
            "AUROC other": versus_other["auroc"], "AUROC negatives": versus_neg["auroc"],
            "AUROC other, energy": unknown.auroc(*by_logits["energy"]),
            "AUROC other, max logit": unknown.auroc(*by_logits["max_logit"]),
            "test top-1": versus_other["accuracy"], "score": cal.method}


def recalibrated(save: Path, known: Path, score: str, cache_dir) -> Path:
    """A copy of the run's checkpoint calibrated with `score` by the `calibrate` command (made once)."""
    copy = save / f"checkpoint-{score}.pth"
    if not copy.exists():
        shutil.copyfile(save / "checkpoint.pth", copy)
        if cli_main(["calibrate", str(copy), str(known), "--unknown_score", score, "--quiet",
                     *(["--cache_dir", str(cache_dir)] if cache_dir else [])]):
            copy.unlink()
            sys.exit(f"calibrating a copy of {save / 'checkpoint.pth'} with {score} failed (above)")
    return copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--negatives", type=Path, required=True, help="photos that are none of the species")
    p.add_argument("--recipes", nargs="+", default=["plain", "best"], choices=list(RECIPES))
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--cache_dir", default=None, help="feature cache shared by the runs")
    p.add_argument("--species", nargs="+", default=None, help="leave out only these (folder names; default every one)")
    p.add_argument("--unknown_scores", nargs="+", default=[], choices=unknown.METHODS, metavar="SCORE",
                   help="also measure each run's checkpoint recalibrated with these scores (`calibrate` on a copy)")
    p.add_argument("--work_dir", type=Path, required=True,
                   help="the folders without each species and each run's checkpoints (a run found there is reused)")
    args = p.parse_args()
    species = find_classes(split_dir(args.data_dir, "train"))
    if unknown_names := sorted(set(args.species or []) - set(species)):
        sys.exit(f"--species: no such species folder in {args.data_dir / 'train'}: {', '.join(unknown_names)}")
    species = [s for s in species if args.species is None or s in args.species]
    negatives = negative_photos(args.negatives)  # checked before any training
    print(f"{len(species)} species, each left out in turn; {len(negatives)} negatives; recipes {args.recipes}")
    for recipe in args.recipes:
        config = TrainConfig.of_recipe(recipe, arch=args.arch)
        rows = {}
        for held in species:
            known = without(args.data_dir, held, args.work_dir / f"without-{held}")
            save = args.work_dir / f"{recipe}-without-{held}"
            start = time.perf_counter()
            if not (save / "checkpoint.pth").exists():
                run_training(config, known, save_dir=save, cache_dir=args.cache_dir, progress=False, log=lambda m: None)
            seconds = time.perf_counter() - start
            held_photos = [f for split in SPLITS for f in list_photos(args.data_dir / split / held)]
            run_outputs = outputs(save / "checkpoint.pth", known, held_photos, args.negatives)
            for score in [None, *args.unknown_scores]:
                checkpoint = save / "checkpoint.pth" if score is None else recalibrated(save, known, score, args.cache_dir)
                row = measure(run_outputs, load_checkpoint(checkpoint).calibration)
                rows.setdefault(row["score"], []).append(row)
                print(f"  {recipe}, {held} left out ({seconds:.0f} s), {row['score']}: {json.dumps(row)}", flush=True)
        for score, of_score in rows.items():
            print(f"{recipe} (score {score}), mean over the {len(of_score)} species left out:")
            for name in FIGURES:
                values = [r[name] for r in of_score]
                print(f"  {name:24s} {statistics.mean(values):.3f}  ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    main()
