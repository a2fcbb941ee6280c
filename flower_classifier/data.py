"""Photo folders in the Oxford 102 layout: DATA/{train,valid,test}/<category>/<image>.

Class order is natural (numeric folder names sort as numbers: "1", "2", ..., "10", "100"), and
every split uses the training split's order, so output index -> category folder is one fixed list
that the checkpoint stores.

An image that cannot be read is skipped, not fatal: it is warned about once (whichever process
meets it first) and counted, see `FlowerFolder.skipped`. The training sampler gives each image
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
from .images import MAX_IMAGE_PIXELS, decode_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
GET_DATA_HINT = "for Oxford 102 run `python -m flower_classifier download flowers`"


def natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, turned upright as its EXIF orientation says. Raises UserError naming the file."""
    return decode_image(path, max_pixels=MAX_IMAGE_PIXELS)


def split_dir(data_dir: str | Path, split: str) -> Path:
    """DATA/<split>, accepting `val` for `valid`; a UserError when the data or split is missing."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise UserError(f"data directory {data_dir} is a file; pass the folder that holds train/ and valid/")
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; expected {data_dir}/train/<category>/"
                        f"*.jpg ({GET_DATA_HINT})")
    for name in SPLIT_NAMES[split]:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise UserError(f"{data_dir}/{split} not found: expected {data_dir}/{split}/<category>/*.jpg "
                    f"({GET_DATA_HINT})")


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


def find_classes(root: Path) -> list[str]:
    """Category folder names of one split, in natural order."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    classes = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=natural_key)
    if not classes:
        raise UserError(f"{root} has no category folders: expected {root}/<category>/*.jpg")
    return classes


class FlowerFolder(Dataset):
    """(image tensor, class index) pairs from one split; an unreadable image yields None (skipped).

    An index may come with a seed, `dataset[(i, seed)]`: the transform then draws its random
    numbers from that seed alone (see `EpochSampler`).
    """

    def __init__(self, root: str | Path, *, transform=None, classes: list[str] | None = None):
        self.root = Path(root)
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.samples: list[tuple[Path, int]] = []
        present = find_classes(self.root)
        unknown = [c for c in present if c not in self.class_to_idx]
        if unknown:
            raise UserError(f"{self.root} has categories that the training split lacks: {', '.join(unknown)}; "
                            f"add training photos for them or remove those folders")
        for c in present:
            images = list_images(self.root / c)
            if not images and classes is None:
                raise UserError(f"category folder {self.root / c} has no images; add photos or remove it")
            self.samples += [(p, self.class_to_idx[c]) for p in images]
        if not self.samples:
            raise UserError(f"{self.root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        # One flag per image, in shared memory: worker processes mark what they skip, so that each
        # file is warned about once over all workers and epochs, and the main process can count.
        self._skipped = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            image = load_image(path)
        except UserError as e:
            if not self._skipped[i]:
                self._skipped[i] = True
                print(f"warning: skipping {e}", file=sys.stderr)
            return None
        if self.transform is None:
            return image, label
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state (dropout) alone
            torch.manual_seed(seed)
            return self.transform(image), label

    def skipped(self) -> list[Path]:
        """The images that could not be read so far (each was warned about once)."""
        return [self.samples[i][0] for i in self._skipped.nonzero().flatten().tolist()]


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
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
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
    """One split as a dataset; valid/test take the training split's `classes`."""
    transform = train_transform(preprocessing) if augment else eval_transform(preprocessing)
    return FlowerFolder(split_dir(data_dir, split), transform=transform, classes=classes)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of `dataset`; when shuffled, the order (and a FlowerFolder's augmentation) of each
    epoch comes from `loader.sampler.set_epoch(epoch)` and `seed`, not from the worker processes."""
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(len(dataset), seed, sample_seeds=isinstance(dataset, FlowerFolder)) if shuffle else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "this DataLoader will create N workers" on small machines
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=skip_none_collate, generator=generator, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
