"""Photos, torch-free: decoding shared by training (data.py) and prediction (predictor.py), the
preprocessing a backbone expects (its description, and its evaluation transform in numpy), and the
one rule for which files in a folder are photos (`list_photos`).

Any file or upload Pillow reads becomes an upright 8-bit RGB image, or a UserError naming it.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError, quoted
from .files import special_kind

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The one pixel limit, for every command and the server. It counts the pixels a decode would
# produce, read from the file's header before the decoder runs (a JPEG read at reduced size counts
# at that size). 64 MP decode to 192 MB of RGB: above any phone photo (12-50 MP) and most cameras,
# far below filling memory, which a small file can claim to do (a 160 kB PNG of 7000x7000 pixels).
MAX_IMAGE_PIXELS = 64_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 1024  # pixels per side of input_size / resize_size: above every backbone's (518 at most), far below what fills memory
# Preprocessing scales the shorter side up to resize_size, so what it allocates grows with the
# aspect ratio, not the file's pixels: a 1x12,000 strip would become 256x3,072,000. Capping the
# ratio at what keeps even a MAX_SIDE resize within the pixel limit (61:1, past any panorama)
# bounds every preprocessing path, for any backbone, before anything is decoded.
MAX_ASPECT = MAX_IMAGE_PIXELS // MAX_SIDE**2
FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}  # torchvision's names


class UnreadableImage(UserError):
    """A file or upload that is not a usable image; `reason` says why without naming it (for a
    caller that names it its own way, as check-data does with paths inside the data folder)."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.reason = reason


class ImageTooLarge(UnreadableImage):
    """An image with more pixels than allowed, or one whose preprocessing would make that many."""


def check_size(label: str, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a size that decoding or preprocessing would turn into too many pixels: the one
    size rule, applied to a file's header before decoding and to a PIL image before resizing."""
    if width * height > max_pixels:
        raise ImageTooLarge(label, f"too large to read ({width}x{height} pixels; the limit is {max_pixels:,})")
    short, long = sorted((width, height))
    if short < 1:
        raise UnreadableImage(label, f"has no pixels ({width}x{height})")
    if long > MAX_ASPECT * short:
        raise ImageTooLarge(label, f"too thin to use ({width}x{height} pixels, {long / short:,.0f}:1): "
                                   f"scaling its shorter side up to the model's input would take more memory than "
                                   f"any photo; at most {MAX_ASPECT}:1 is read, so crop it")


# ---------------------------------------------------------------- what a backbone expects

def _check_preprocessing(where: str | None, input_size, resize_size, mean, std, interpolation) -> None:
    """Type and range of each field, so an edited file is refused before anything is allocated."""
    where = f"{where}: preprocessing" if where else "preprocessing"
    for field, value in (("input_size", input_size), ("resize_size", resize_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 8 <= value <= MAX_SIDE:
            raise UserError(f"{where} {field} must be a whole number of pixels from 8 to {MAX_SIDE} (got {quoted(value)})")
    for field, values, allowed, ok in (("mean", mean, "[0, 1]", lambda v: 0 <= v <= 1),
                                       ("std", std, "(0, 1]", lambda v: 0 < v <= 1)):  # nan fails both
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and ok(v) for v in values)):
            raise UserError(f"{where} {field} must be 3 numbers in {allowed}, one per colour (got {quoted(values)})")
    if interpolation not in FILTERS:
        raise UserError(f"{where} interpolation must be one of {', '.join(FILTERS)} "
                        f"(got {quoted(interpolation)})")


@dataclass(frozen=True)
class Preprocessing:
    """How an image must be prepared for a backbone: resize shorter side, centre crop, normalize."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # name of a torchvision InterpolationMode

    def __post_init__(self):
        _check_preprocessing(None, self.input_size, self.resize_size, self.mean, self.std,
                             self.interpolation)

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d, *, where: str | None = None) -> "Preprocessing":
        """From data read off disk (a checkpoint, ONNX metadata): every field checked, `where` named."""
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise UserError(f"{prefix}preprocessing must be a dict of input_size, resize_size, mean, std "
                            f"(got {type(d).__name__})")
        fields = (d.get("input_size"), d.get("resize_size"), d.get("mean"), d.get("std"), d.get("interpolation", "bilinear"))
        _check_preprocessing(where, *fields)
        return cls(int(fields[0]), int(fields[1]), tuple(map(float, fields[2])), tuple(map(float, fields[3])),
                   fields[4])


def preprocess(image: Image.Image, p: Preprocessing) -> np.ndarray:
    """Shorter side to resize_size, centre crop input_size, normalize. -> float32 (3, S, S)

    torchvision's Resize / CenterCrop / ToTensor / Normalize on a Pillow image (`data.eval_transform`,
    which training and evaluation use), step by step in numpy: a test holds them equal.
    """
    w, h = image.size
    check_size("image", w, h, max_pixels=w * h)  # a PIL image given directly: its aspect ratio only
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = p.resize_size, int(p.resize_size * long / short)
    image = image.resize((new_short, new_long) if w <= h else (new_long, new_short), FILTERS[p.interpolation])
    w, h = image.size
    crop = p.input_size
    if w < crop or h < crop:  # only when resize_size < input_size: torchvision pads with zeros
        padded = Image.new("RGB", (max(w, crop), max(h, crop)))
        padded.paste(image, ((max(w, crop) - w) // 2, (max(h, crop) - h) // 2))
        image, (w, h) = padded, padded.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.float32) / np.float32(255)  # (S, S, 3) in [0, 1]
    array = (array - np.asarray(p.mean, dtype=np.float32)) / np.asarray(p.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, S, S)


# ---------------------------------------------------------------- decoding

def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent areas become white, 16-bit values are rescaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")  # 0..65535 -> 0..255 instead of clipping
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # convert() would copy an RGBA image
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(source: str | Path | bytes, *, label: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_size: int | None = None) -> Image.Image:
    """An upright RGB image from a file path or the bytes of an upload; UserError if it is not one.

    `label` names the photo in messages (default: its path, or "upload"). With `min_size`, a large
    JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's `draft`), its shorter side never below
    `min_size`: a fraction of the memory and time, for prediction, which resizes it down anyway.
    """
    if not isinstance(source, (str, Path, bytes)):
        raise UserError(f"an image must be a file path, the bytes of a file, or a PIL image "
                        f"(got {type(source).__name__})")
    label = label or ("upload" if isinstance(source, bytes) else str(source))
    kind = None if isinstance(source, bytes) else special_kind(source)
    if kind:  # never opened: reading a FIFO blocks until something writes to it
        raise UnreadableImage(label, f"is {kind}, not a photo file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:  # header only
                if min_size:
                    im.draft("RGB", (min_size, min_size))  # JPEG only; sets the size it will decode at
                check_size(label, im.width, im.height, max_pixels)
                im.load()  # the decoder runs here, and only here
                ImageOps.exif_transpose(im, in_place=True)  # in place: one copy of a large photo, not three
                return to_rgb(im)
    except UserError:
        raise
    except FileNotFoundError:
        raise UnreadableImage(label, "no such file") from None
    except IsADirectoryError:
        raise UnreadableImage(label, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise UnreadableImage(label, "not a readable image (not a format Pillow reads: JPEG, PNG, WebP, GIF, "
                                     "BMP, TIFF...)") from None
    except Image.DecompressionBombError:  # beyond twice Pillow's own limit: refused by Image.open itself
        raise ImageTooLarge(label, f"too large to read (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; the "
                                   f"limit is {max_pixels:,})") from None
    except Exception as e:  # decoders raise many kinds on a damaged file (OSError, SyntaxError, struct.error...)
        raise UnreadableImage(label, f"not a readable image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- which files are photos

def is_hidden(name: str) -> bool:
    """Dot files (`.DS_Store`, macOS's `._x.jpg` twins) and folders, and macOS zip leftovers."""
    return name.startswith(".") or name == "__MACOSX"


def scan_category(folder: Path) -> tuple[list[Path], list[Path]]:
    """(photos, other files) in a category folder and its subfolders, each list sorted by path.

    A photo is a file with an image extension; hidden files and folders count as neither. Folder
    links are followed, each real folder once, except links back up to the folder or above it (a
    loop, or another category's photos).
    """
    photos, others, seen = [], [], set()
    top = Path(os.path.realpath(folder))
    for where, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(where)
        if real in seen or (seen and top.is_relative_to(real)):
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [f for f in folders if not is_hidden(f)]
        for name in names:
            path = Path(where) / name
            if is_hidden(name) or not path.is_file():  # is_file: no broken links, pipes or devices
                continue
            (photos if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    key = lambda p: p.relative_to(folder).parts
    return sorted(photos, key=key), sorted(others, key=key)


def list_photos(folder: Path) -> list[Path]:
    """The photos of a category folder, its subfolders included (see `scan_category`)."""
    return scan_category(folder)[0]
