"""Photo folders in the Oxford 102 layout: DATA/{train,valid,test}/<category>/<image>.

Class order is natural (numeric folder names sort as numbers: "1", "2", ..., "10", "100"), and
every split uses the training split's order, so output index -> category folder is one fixed list
that the checkpoint stores.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T

from .backbones import Preprocessing
from .errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
GET_DATA_HINT = "for Oxford 102 run `python -m flower_classifier download flowers`"


def natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, turned upright as its EXIF orientation says. Raises UserError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent areas become white, 16-bit values are rescaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale 0..65535 to 0..255 instead of letting PIL clip it.
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")


def split_dir(data_dir: str | Path, split: str) -> Path:
    """DATA/<split>, accepting `val` for `valid`; a UserError when the data or split is missing."""
    data_dir = Path(data_dir)
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
    """(image tensor, class index) pairs from one split; an unreadable image yields None (skipped)."""

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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            image = load_image(path)
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            return None
        return (self.transform(image) if self.transform else image), label


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
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "this DataLoader will create N workers" on small machines
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          collate_fn=skip_none_collate, generator=generator, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
