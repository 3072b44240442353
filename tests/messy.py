"""Builds a folder of bad and odd image files, every kind a scraped or phone-copied dataset has."""

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def _png_header_only(width, height):
    """A PNG whose header claims width x height pixels: a decompression bomb's first bytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _photo(size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def bad_files():
    """name -> bytes of files that must be skipped, with a word their reason contains."""
    jpeg = _encoded(_photo(), "JPEG")
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "random.png": (np.random.default_rng(1).bytes(500), "cannot identify"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "cannot identify"),
        "notes.jpeg": (b"just some text, saved with the wrong extension\n", "cannot identify"),
        "bomb.png": (_png_header_only(100_000, 100_000), "over the limit"),
    }


def odd_files():
    """name -> bytes of unusual but valid images, all of which must be used."""
    photo = _photo()
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6
    animated = io.BytesIO()
    photo.save(animated, "GIF", save_all=True, append_images=[_photo(seed=2)], duration=100)
    return {
        "png_named.jpg": _encoded(photo, "PNG"),
        "jpeg_named.png": _encoded(photo, "JPEG"),
        "UPPER.JPG": _encoded(photo, "JPEG"),
        "rgba.png": _encoded(rgba, "PNG"),
        "palette.png": _encoded(photo.convert("P"), "PNG"),
        "gray.png": _encoded(photo.convert("L"), "PNG"),
        "sixteen_bit.png": _encoded(Image.fromarray(
            np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
        "cmyk.jpg": _encoded(photo.convert("CMYK"), "JPEG"),
        "progressive.jpg": _encoded(photo, "JPEG", progressive=True),
        "bitmap.bmp": _encoded(photo, "BMP"),
        "animated.gif": animated.getvalue(),
        "modern.webp": _encoded(photo, "WEBP"),
        "scan.tiff": _encoded(photo, "TIFF"),
        "phone.jpg": _encoded(photo, "JPEG", exif=exif),
        "tiny.png": _encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "panorama.png": _encoded(_photo((600, 2)), "PNG"),
        "naïve café photo.jpg": _encoded(photo, "JPEG"),
    }


def ignored_files():
    """Files that are not images at all and must not even be tried."""
    return {".DS_Store": b"\0\0\0\1Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0", "._photo.jpg": b"\0",
            "readme.txt": b"hello"}


def write_all(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        data = content[0] if isinstance(content, tuple) else content
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
