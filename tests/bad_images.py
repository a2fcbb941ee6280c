"""A corpus of odd and broken image files, as a user's photo folder may hold them.

`CORPUS` lists them: each entry writes one file and says whether training must use it (as RGB,
upright) or skip it with a warning. The README's count of bad inputs is `len(CORPUS)`.
"""
from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

SIZE = (48, 40)  # width, height


@dataclass(frozen=True)
class BadImage:
    name: str  # file name, extension included
    what: str
    usable: bool  # True: loads as an RGB image; False: skipped with a warning
    write: Callable[[Path, tuple], None]  # (path, RGB colour) -> writes the file


def _rgb(color, size=SIZE) -> Image.Image:
    return Image.new("RGB", size, tuple(color))


def _jpeg_bytes(color) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, size=(SIZE[1], SIZE[0], 3), dtype=np.uint8)
    Image.blend(_rgb(color), Image.fromarray(noise), 0.1).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=None)
def _grey_png(width: int, height: int, with_pixels: bool) -> bytes:
    """A greyscale PNG of any claimed size; with pixels, a real (zeros, well compressed) image."""
    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + one byte per pixel
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush() if with_pixels else zlib.compress(b"")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _write(data_fn):
    return lambda path, color: path.write_bytes(data_fn(color))


def _save(convert, fmt="PNG", **kwargs):
    return lambda path, color: convert(_rgb(color)).save(path, fmt, **kwargs)


def _palette_with_transparency(im: Image.Image) -> Image.Image:
    p = Image.new("P", SIZE, 0)
    p.putpalette(list(im.getpixel((0, 0))) + [0, 0, 0])  # index 0: the colour, 1: transparent
    p.paste(1, (0, 0, SIZE[0] // 2, SIZE[1]))  # left half transparent
    p.info["transparency"] = 1
    return p


def _sixteen_bit(im: Image.Image) -> Image.Image:
    grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257  # 0..255 -> 0..65535
    return Image.fromarray(grey)


def _rgba_half_transparent(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, SIZE[0] // 2, SIZE[1]))
    return rgba


def _exif_rotated(path: Path, color) -> None:
    """Stored 48x40 (left half the colour, right half black) with orientation 6: upright 40x48,
    colour on top."""
    im = _rgb(color)
    im.paste((0, 0, 0), (SIZE[0] // 2, 0, SIZE[0], SIZE[1]))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif(path: Path, color) -> None:
    frames = [_rgb(color), _rgb((255 - color[0], 255 - color[1], 255 - color[2]))]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


CORPUS: list[BadImage] = [
    BadImage("truncated.jpg", "JPEG cut off halfway", False,
             _write(lambda c: _jpeg_bytes(c)[: len(_jpeg_bytes(c)) // 2])),
    BadImage("truncated.png", "PNG cut off halfway", False,
             _write(lambda c: _png_bytes(Image.fromarray(np.random.default_rng(1).integers(
                 0, 255, size=(SIZE[1], SIZE[0], 3), dtype=np.uint8)))[:600])),
    BadImage("empty.jpg", "zero-byte file", False, _write(lambda c: b"")),
    BadImage("notes.jpg", "text file named .jpg", False, _write(lambda c: b"shopping list: tulips, roses\n")),
    BadImage("bomb.png", "real 8100x8100 PNG: 66 megapixels in 64 KB, over the pixel limit", False,
             _write(lambda c: _grey_png(8100, 8100, True))),
    BadImage("huge_header.png", "PNG header claiming 40000x40000 pixels", False,
             _write(lambda c: _grey_png(40000, 40000, False))),
    BadImage("grey.jpg", "greyscale JPEG", True, _save(lambda im: im.convert("L"), "JPEG")),
    BadImage("grey_alpha.png", "greyscale PNG with alpha", True, _save(lambda im: im.convert("LA"))),
    BadImage("cmyk.jpg", "CMYK JPEG", True, _save(lambda im: im.convert("CMYK"), "JPEG", quality=95)),
    BadImage("rgba.png", "RGBA PNG, left half transparent", True, _save(_rgba_half_transparent)),
    BadImage("palette.png", "palette PNG with a transparent colour", True, _save(_palette_with_transparency)),
    BadImage("sixteen_bit.png", "16-bit greyscale PNG", True, _save(_sixteen_bit)),
    BadImage("one_bit.png", "1-bit black and white PNG", True, _save(lambda im: im.convert("1"))),
    BadImage("exif_rotated.jpg", "JPEG with EXIF orientation 6 (rotate 90 degrees)", True, _exif_rotated),
    BadImage("png_named.jpg", "PNG file named .jpg", True, _save(lambda im: im, "PNG")),
    BadImage("one_pixel.png", "1x1 pixel image", True, lambda path, c: _rgb(c, (1, 1)).save(path, "PNG")),
    BadImage("animated.gif", "animated GIF (first frame is used)", True, _animated_gif),
]


# Photos whose preprocessing would allocate far more than their file's pixels (the shorter side is
# scaled up to the resize size): refused by their header, like the bombs above, never decoded.
THIN: list[BadImage] = [
    BadImage("strip_1x200.png", "real 1x200 PNG (200:1): 256x51,200 after resizing", False,
             _write(lambda c: _grey_png(1, 200, True))),
    BadImage("strip_12000x1.png", "real 12000x1 PNG, 132 bytes: 3 million pixels long after resizing", False,
             _write(lambda c: _grey_png(12000, 1, True))),
    BadImage("strip_header.png", "PNG header claiming 1x64,000,000 pixels (at the pixel limit)", False,
             _write(lambda c: _grey_png(1, 64_000_000, False))),
    BadImage("panorama_61.png", "61:1 panorama (61x1), the widest ratio read", True,
             lambda path, c: _rgb(c, (61, 1)).save(path, "PNG")),
]


def write_corpus(folder: Path, color=(200, 60, 90)) -> list[Path]:
    """Every corpus file in `folder`; returns their paths in CORPUS order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in CORPUS:
        item.write(folder / item.name, color)
        paths.append(folder / item.name)
    return paths
