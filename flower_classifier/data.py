"""Photo folders in the Oxford 102 layout: DATA/{train,valid,test}/<category>/<image>.jpg.

This module alone knows such a folder: where its splits are (`split_dir`, `find_splits`), its
categories (`list_categories`, `find_classes`), which files count as photos (`list_photos`, the one
rule, kept torch-free in `images`), and how a photo becomes a tensor (`PhotoList`). A category's photos may sit in subfolders, as
torchvision's ImageFolder allows. Hidden files and folders (a name starting with ".", macOS's
`._x.jpg` and `.DS_Store`, and `__MACOSX`) are never photos nor categories.

Class order is natural (numeric folder names sort as numbers: "1", "2", ..., "10", "100"), and
every split uses the training split's order, so output index -> category folder is one fixed list
that the checkpoint stores. A classifier needs two categories, each with a readable photo.

An image that cannot be read is skipped, not fatal: it is warned about once (whichever process
meets it first) and counted, see `PhotoList.skipped`. The training sampler gives each image
of each epoch its own seed, so augmentation depends on (seed, epoch, index) alone: the same with
0 or N workers, and the same after `--resume`.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T

from .backbones import Preprocessing
from .errors import UserError
# The one rule for which files are photos lives with the torch-free image code, for predict.py on .onnx
# models; this module's own callers find it here as before.
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, decode_image, is_hidden, list_photos, scan_category  # noqa: F401

SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
GET_DATA_HINT = "for Oxford 102 run `python -m flower_classifier download flowers`"
EXAMPLES = 5  # how many names a message lists before "and N more"


def natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def listing(names, limit: int = EXAMPLES) -> str:
    """'a, b, c and 4 more'."""
    names = [str(n) for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_image(source: str | Path | bytes) -> Image.Image:
    """An RGB image, turned upright as its EXIF orientation says. Raises UserError naming the file
    (`images.UnreadableImage`, whose `reason` says why without the name)."""
    return decode_image(source, max_pixels=MAX_IMAGE_PIXELS)


# ---------------------------------------------------------------- splits

def check_data_dir(data_dir: str | Path) -> Path:
    """DATA as a Path; a UserError when it is a file or missing."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise UserError(f"data directory {data_dir} is a file; pass the folder that holds train/ and valid/")
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; expected {data_dir}/train/<category>/"
                        f"*.jpg ({GET_DATA_HINT})")
    return data_dir


def find_splits(data_dir: str | Path) -> dict[str, Path]:
    """The split folders DATA holds, by split ("train", "valid", "test"); `val` counts as `valid`."""
    found = {split: next((Path(data_dir, n) for n in names if Path(data_dir, n).is_dir()), None)
             for split, names in SPLIT_NAMES.items()}
    return {split: folder for split, folder in found.items() if folder is not None}


def split_dir(data_dir: str | Path, split: str) -> Path:
    """DATA/<split>, accepting `val` for `valid`; a UserError when the data or split is missing."""
    data_dir = check_data_dir(data_dir)
    folder = find_splits(data_dir).get(split)
    if folder is None:
        raise UserError(f"{data_dir}/{split} not found: expected {data_dir}/{split}/<category>/*.jpg "
                        f"({GET_DATA_HINT})")
    return folder


def one_split(path: str | Path) -> Path:
    """A folder given as one split (DATA/test, say); a UserError for the data folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; expected a split folder such as DATA/test")
    held = [folder.name for folder in find_splits(path).values()]
    if held:
        raise UserError(f"{path} holds the splits {', '.join(held)}; pass one of them, "
                        f"e.g. {path / ('test' if 'test' in held else held[0])}")
    return path


# ---------------------------------------------------------------- categories and photos

def list_categories(root: Path) -> list[str]:
    """Category folder names of one split, in natural order (none when `root` has none)."""
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)), key=natural_key)


def find_classes(root: Path) -> list[str]:
    """The categories a model learns: those of a training split, at least two."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    classes = list_categories(root)
    if not classes:
        raise UserError(f"{root} has no category folders: expected {root}/<category>/*.jpg")
    if len(classes) == 1:
        raise UserError(f"{root} has one category folder ({classes[0]}): a classifier needs at least two; "
                        f"add a folder of photos of another category")
    return classes


def refuse_unreadable_categories(root: Path, classes: list[str], readable: set[int]) -> None:
    """A training category without a single readable photo cannot be learnt: refused in one line."""
    empty = [c for i, c in enumerate(classes) if i not in readable]
    if empty:
        raise UserError(f"{root}: {len(empty)} training {'category has' if len(empty) == 1 else 'categories have'} "
                        f"no readable photo ({listing(empty)}): add photos or remove the folders "
                        f"(`python -m flower_classifier check-data` names each file)")


def _decodes(path: Path) -> bool:
    try:
        load_image(path)
        return True
    except UserError:
        return False


# ---------------------------------------------------------------- photos as tensors

class PhotoList(Dataset):
    """(image tensor, target) pairs of `samples`, (path, target) pairs; an unreadable photo yields None.

    It is warned about once, whichever worker process meets it first, and recorded (`skipped`). An
    index may come with a seed, `photos[(i, seed)]`, or each photo may have its own (`seeds`): the
    transform then draws its random numbers from that seed alone (see `EpochSampler`).
    """

    def __init__(self, samples: list[tuple[Path, int]], transform=None, seeds: list[int | None] | None = None):
        self.samples, self.transform, self.seeds = samples, transform, seeds
        # One flag per photo, in shared memory: worker processes mark what they skip, so that each
        # file is warned about once over all workers and epochs, and the main process can count.
        self._skipped = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, self.seeds[key] if self.seeds else None)
        path, target = self.samples[i]
        try:
            image = load_image(path)
        except UserError as e:
            if not self._skipped[i]:
                self._skipped[i] = True
                print(f"warning: skipping {e}", file=sys.stderr)
            return None
        if self.transform is None:
            return image, target
        if seed is None:
            return self.transform(image), target
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state (dropout) alone
            torch.manual_seed(seed)
            return self.transform(image), target

    def skipped(self) -> list[Path]:
        """The photos that could not be read so far (each was warned about once)."""
        return [self.samples[i][0] for i in self._skipped.nonzero().flatten().tolist()]


class FlowerFolder(PhotoList):
    """(image tensor, class index) pairs from one split folder (see `PhotoList`).

    Without `classes` this is a training split: its categories are the classes, each must hold photos.
    """

    def __init__(self, root: str | Path, *, transform=None, classes: list[str] | None = None):
        self.root = Path(root)
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such directory")
        present = list_categories(self.root)
        if not present:
            raise UserError(f"{self.root} has no category folders: expected {self.root}/<category>/*.jpg")
        unknown = [c for c in present if c not in self.class_to_idx]
        if unknown:
            raise UserError(f"{self.root} has categories that the training split lacks: {', '.join(unknown)}; "
                            f"add training photos for them or remove those folders")
        samples = []
        for c in present:
            photos = list_photos(self.root / c)
            if not photos and classes is None:
                raise UserError(f"category folder {self.root / c} has no images; add photos or remove it")
            samples += [(p, self.class_to_idx[c]) for p in photos]
        if not samples:
            raise UserError(f"{self.root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        super().__init__(samples, transform)

    def require_readable_categories(self) -> None:
        """Refuse a category none of whose photos decodes, before any epoch: one decode per category
        when all is well (the classic loop; the cached path learns it from the feature pass)."""
        by_class: dict[int, list[Path]] = {}
        for path, label in self.samples:
            by_class.setdefault(label, []).append(path)
        # any() stops at the first photo that decodes: usually one decode per category.
        readable = {label for label, paths in by_class.items() if any(map(_decodes, paths))}
        refuse_unreadable_categories(self.root, self.classes, readable)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch` of a run seeded `seed`: its order, augmentation and dropout."""
    return seed * 1_000_003 + epoch


class EpochSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch); call `set_epoch` before each epoch.

    With `sample_seeds`, it yields (index, seed) pairs, each image's seed drawn from (seed, epoch,
    index), so that augmentation does not depend on which worker process loads the image or on
    what ran before: a resumed run sees the same images as an uninterrupted one.
    """

    def __init__(self, size: int, seed: int = 0, *, sample_seeds: bool = False):
        self.size, self.seed, self.sample_seeds, self.epoch = size, seed, sample_seeds, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        seeds = torch.randint(0, 2**62, (self.size,), generator=g).tolist()  # by index, not by position
        order = torch.randperm(self.size, generator=g).tolist()
        return iter([(i, seeds[i]) for i in order] if self.sample_seeds else order)


def skipped_images(*datasets) -> list[Path]:
    """The unreadable images met so far in these datasets (any without a record count as none)."""
    return [p for d in datasets for p in (d.skipped() if hasattr(d, "skipped") else [])]


def skip_none_collate(batch):
    """Collate a batch, leaving out images that failed to load; None if none loaded."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def _interpolation(p: Preprocessing) -> T.InterpolationMode:
    return T.InterpolationMode(p.interpolation)


def eval_transform(p: Preprocessing) -> T.Compose:
    """Shorter side to `resize_size`, centre crop `input_size`, normalize: evaluation and prediction."""
    return T.Compose([T.Resize(p.resize_size, interpolation=_interpolation(p), antialias=True),
                      T.CenterCrop(p.input_size), T.ToTensor(), T.Normalize(p.mean, p.std)])


def train_transform(p: Preprocessing) -> T.Compose:
    """Random resized crop, small rotation, horizontal flip, normalize."""
    return T.Compose([T.RandomResizedCrop(p.input_size, interpolation=_interpolation(p), antialias=True),
                      T.RandomRotation(15), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(p.mean, p.std)])


def load_split(data_dir: str | Path, split: str, preprocessing: Preprocessing, *,
               classes: list[str] | None = None, augment: bool = False) -> FlowerFolder:
    """One split as a dataset; valid/test take the training split's `classes`. Without `classes`
    (the training split), a category without a readable photo is refused here."""
    transform = train_transform(preprocessing) if augment else eval_transform(preprocessing)
    dataset = FlowerFolder(split_dir(data_dir, split), transform=transform, classes=classes)
    if classes is None:  # the training split, which defines the classes
        dataset.require_readable_categories()
    return dataset


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of `dataset`; when shuffled, the order (and a PhotoList's augmentation) of each
    epoch comes from `loader.sampler.set_epoch(epoch)` and `seed`, not from the worker processes."""
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(len(dataset), seed, sample_seeds=isinstance(dataset, PhotoList)) if shuffle else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "this DataLoader will create N workers" on small machines
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=skip_none_collate, generator=generator, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
