"""Look over a photo folder before training: `python -m flower_classifier check-data DATA`.

It sees the folder as training does (`data`: the same splits, categories and photos, subfolders
included, hidden files never). A *problem* breaks or poisons training: a missing split, fewer than
two training categories, a training category with no readable image, a validation or test category
that training lacks, the same photo in two splits (test accuracy would be measured on training
photos) or in two categories (two labels for one photo), an Oxford 102 download that did not finish.
A *warning* is worth knowing but training copes: unreadable files (skipped), non-image files
(ignored), categories missing from valid/test, a names file that misses or adds categories,
duplicates within a category, and class imbalance above a ratio.
"""
from __future__ import annotations

import hashlib
import signal
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


from .progress import progress_bar
from .config import MAX_IMBALANCE  # declared with the other options, so that the CLI needs no torch
from .errors import UserError
from .data import EXAMPLES, SPLIT_NAMES, check_data_dir, find_splits, list_categories, listing, load_image
from .images import UnreadableImage, list_photos, scan_category
from .names import folder_names, names_warnings
from .oxford102 import unfinished_download


@dataclass
class Report:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> category -> readable images
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not self.problems


def _count(n: int, word: str) -> str:
    """'1 photo', '2 photos'; '1 category', '2 categories'."""
    plural = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{n} {word if n == 1 else plural}"


def photo_digest(content: bytes) -> str:
    """What makes two photos the same photo here: the same bytes (sha256)."""
    return hashlib.sha256(content).hexdigest()


def inspect_file(path: Path) -> tuple[str, str | None]:
    """`photo_digest` of the file's bytes, and why it cannot be read as an image (None if it can)."""
    try:
        content = path.read_bytes()  # read once: hashed, then decoded from memory
    except OSError as e:
        return "", f"cannot be read ({e.strerror})"
    try:
        load_image(content)
    except UnreadableImage as e:
        return photo_digest(content), e.reason
    return photo_digest(content), None


def shared_photos(photos: list[Path], others: list[Path]) -> list[tuple[Path, Path]]:
    """(photo, other) pairs, each photo of `photos` that is also (`photo_digest`) in `others` with one of
    its copies there, as check-data finds photos shared by two splits; unreadable files share nothing."""
    def digests(paths: list[Path]) -> list[tuple[str, Path]]:
        found = []
        for p in paths:
            try:
                found.append((photo_digest(Path(p).read_bytes()), Path(p)))
            except OSError:
                continue
        return found

    theirs = dict(reversed(digests(others)))  # digest -> its first photo in `others`
    return [(p, theirs[d]) for d, p in digests(photos) if d in theirs]


def split_photos(data_dir: str | Path) -> dict[str, list[Path]]:
    """The photos of each split of the data folder, by the one rule for what is a photo."""
    return {split: [p for c in list_categories(folder) for p in list_photos(folder / c)]
            for split, folder in find_splits(data_dir).items()}


def seen_in_training(photos: list[Path], data_dir: str | Path) -> list[tuple[Path, Path]]:
    """(photo, the same photo in the train or valid split of `data_dir`) pairs."""
    splits = split_photos(data_dir)
    return shared_photos(photos, splits.get("train", []) + splits.get("valid", []))


def check_data(data_dir: str | Path, *, cat_to_name: dict[str, str] | None = None,
               max_imbalance: float = MAX_IMBALANCE, workers: int = 0, progress: bool = False) -> Report:
    data_dir = check_data_dir(data_dir)
    report = Report()
    unfinished = unfinished_download(data_dir)
    if unfinished:
        report.problems.append(unfinished)
    splits = find_splits(data_dir)
    for split in ("train", "valid"):
        if split not in splits:
            report.problems.append(f"no {split}/ folder in {data_dir}: expected {data_dir}/{split}/<category>/*.jpg")
    if "test" not in splits:
        report.warnings.append(f"no test/ folder in {data_dir}: nothing to measure the final accuracy on")

    # Every photo of every category folder: (split, category, path).
    files, others = [], defaultdict(list)
    categories: dict[str, list[str]] = {}
    for split, root in splits.items():
        categories[split] = list_categories(root)
        for c in categories[split]:
            photos, other = scan_category(root / c)
            files += [(split, c, p) for p in photos]
            others[split] += other
    paths = [p for _, _, p in files]
    bar = dict(total=len(paths), desc="checking images", unit="image", enabled=progress)
    if workers > 0:
        # Ctrl-C reaches the workers too: let only the main process handle it (no traceback per worker).
        with ProcessPoolExecutor(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            results = list(progress_bar(pool.map(inspect_file, paths, chunksize=32), **bar))
    else:
        results = [inspect_file(p) for p in progress_bar(paths, **bar)]

    rel = lambda p: p.relative_to(data_dir)
    counts = {split: {c: 0 for c in categories[split]} for split in splits}
    by_hash = defaultdict(list)
    for (split, c, p), (digest, error) in zip(files, results):
        if error:
            report.warnings.append(f"{rel(p)}: {error}; training skips it")
            continue
        counts[split][c] += 1
        by_hash[digest].append((split, c, p))
    report.counts = counts
    for split, paths_ in others.items():
        if not paths_:
            continue
        report.warnings.append(f"{split}: {_count(len(paths_), 'file')} without an image extension, ignored "
                               f"({listing([rel(p) for p in paths_])})")

    train = categories.get("train", [])
    if "train" in splits and len(train) < 2:
        report.problems.append(f"train: {_count(len(train), 'category')}{f' ({train[0]})' if train else ''}: "
                               f"a classifier needs at least two; add category folders of photos")
    for split in splits:
        empty = [c for c in categories[split] if counts[split][c] == 0]
        if empty and split == "train":
            report.problems.append(f"train: {_count(len(empty), 'category')} without a readable image "
                                   f"({listing(empty)}): add photos or remove the folders")
        elif empty:
            report.warnings.append(f"{split}: {_count(len(empty), 'category')} without a readable image "
                                   f"({listing(empty)})")
        if split != "train" and "train" in splits:
            unknown = [c for c in categories[split] if c not in train]
            if unknown:
                report.problems.append(f"{split}: {_count(len(unknown), 'category')} not in train/ "
                                       f"({listing(unknown)}): the model cannot predict them")
            absent = [c for c in train if c not in categories[split]]
            if absent:
                report.warnings.append(f"{split}: no photos of {_count(len(absent), 'training category')} "
                                       f"({listing(absent)})")
        nonzero = {c: n for c, n in counts[split].items() if n}
        if len(nonzero) > 1:
            most, fewest = max(nonzero, key=nonzero.get), min(nonzero, key=nonzero.get)
            ratio = nonzero[most] / nonzero[fewest]
            if ratio > max_imbalance:
                report.warnings.append(f"{split}: class imbalance {ratio:.1f}x (category {most}: {nonzero[most]} "
                                       f"images, category {fewest}: {nonzero[fewest]}), above {max_imbalance:g}x")

    for group in by_hash.values():
        if len(group) < 2:
            continue
        names = " = ".join(str(rel(p)) for _, _, p in group[:EXAMPLES]) + (" ..." if len(group) > EXAMPLES else "")
        in_splits = [s for s in SPLIT_NAMES if any(s == split for split, _, _ in group)]
        if len(in_splits) > 1:
            report.problems.append(f"identical images in {' and '.join(in_splits)}: {names}")
        elif len({c for _, c, _ in group}) > 1:
            report.problems.append(f"identical images in different categories: {names}")
        else:
            report.warnings.append(f"identical images: {names}")

    if cat_to_name is not None:
        own_names, own = folder_names(data_dir)
        every = set().union(*map(set, categories.values())) if categories else set()
        report.warnings += names_warnings(cat_to_name, train, "names file", every=every, reference=own_names,
                                          other=own, fix="drop --category_names to use the folder's own")
    return report


def format_report(report: Report, data_dir: str | Path) -> list[str]:
    """The report as lines: a count per split, each problem and warning, and the verdict."""
    sizes = ", ".join(f"{s} {sum(c.values()):,} images in {len(c)} categories" for s, c in report.counts.items())
    lines = [f"{data_dir}: {sizes or 'no splits'}"]
    lines += [f"problem: {p}" for p in report.problems] + [f"warning: {w}" for w in report.warnings]
    summary = f"{_count(len(report.problems), 'problem')}, {_count(len(report.warnings), 'warning')}"
    lines.append(f"{summary}: safe to train" if report.safe else f"{summary}: fix the problems before training")
    return lines


def negative_photos(folder: str | Path, *, option: str = "--negatives", data_dir: str | Path | None = None) -> list[Path]:
    """The photos of a folder of non-species photos; refused in one line when there are none, or (given
    the `data_dir` trained on) when some are the species' own train or valid photos."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option} {folder}: no such directory; pass a folder of photos that are none of the species")
    photos = list_photos(folder)
    if not photos:
        raise UserError(f"{option} {folder} holds no photos; pass a folder of photos that are none of the species")
    shared = seen_in_training(photos, data_dir) if data_dir is not None else []
    if shared:
        raise UserError(f"{option} {folder}: {len(shared)} of its photos are the species' own training or validation "
                        f"photos (e.g. {shared[0][0]} = {shared[0][1]}); pass photos that are none of the species")
    return photos
