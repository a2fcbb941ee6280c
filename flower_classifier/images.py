"""Photo decoding shared by training (data.py) and torch-free inference (runtime.py): any file or
upload Pillow reads becomes an upright 8-bit RGB image, or a UserError naming it."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

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


def decode_image(source: str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_size: int | None = None) -> Image.Image:
    """An upright RGB image from a file path or the bytes of an upload; UserError if it is not one.

    With `min_size`, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's `draft`), its shorter
    side never below `min_size`: a fraction of the time, for a caller that resizes it down anyway.
    """
    if not isinstance(source, (str, Path, bytes)):
        raise UserError(f"an image must be a file path, the bytes of a file, or a PIL image "
                        f"(got {type(source).__name__})")
    label = "upload" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:  # header only
                if min_size:
                    im.draft("RGB", (min_size, min_size))  # JPEG only; sets the size it will decode at
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
