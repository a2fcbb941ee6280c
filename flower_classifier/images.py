"""Photo decoding shared by training (data.py) and torch-free inference (runtime.py): any file or
upload Pillow reads becomes an upright 8-bit RGB image, or a UserError naming it; and the one rule
for which files in a folder are photos (`list_photos`)."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Far above any camera photo, far below what would fill memory: a small file can hold a vast PNG.
MAX_IMAGE_PIXELS = 64_000_000


class UnreadableImage(UserError):
    """A file or upload that is not a usable image; `reason` says why without naming it (for a
    caller that names it its own way, as check-data does with paths inside the data folder)."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.reason = reason


class ImageTooLarge(UnreadableImage):
    """An image with more pixels than allowed."""


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent areas become white, 16-bit values are rescaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")  # 0..65535 -> 0..255 instead of clipping
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_image(source: str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An upright RGB image from a file path or the bytes of an upload; UserError if it is not one."""
    if not isinstance(source, (str, Path, bytes)):
        raise UserError(f"an image must be a file path, the bytes of a file, or a PIL image "
                        f"(got {type(source).__name__})")
    label = "upload" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:  # header only
                if im.width * im.height > max_pixels:
                    raise ImageTooLarge(label, f"too large to read ({im.width}x{im.height} pixels; the limit "
                                               f"is {max_pixels:,})")
                return to_rgb(ImageOps.exif_transpose(im))
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
