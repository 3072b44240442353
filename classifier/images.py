"""Finding, decoding and preprocessing images: the one path that train.py and predict.py share.

Every image the model sees, in training or in prediction, goes through `load_image` (or
`load_image_bytes`, the same for an image held in memory, an upload to serve.py):
decode (any format Pillow knows, EXIF orientation applied, transparency on white), convert
to RGB, resize with area interpolation to a square, keep uint8. Scaling to [0, 1] happens
inside the model (its first layer), so exported models take raw pixels too.

Complete RGB and grayscale JPEGs, most photos, are decoded by OpenCV instead of Pillow: the
same libjpeg-turbo, at the same reduced DCT scale, giving the same pixels faster. Everything
else (other formats, CMYK, truncated files) takes Pillow's path.
"""

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from classifier.cli import UserError

log = logging.getLogger(__name__)

# decode_image checks the pixel count itself, against a limit the user can set (--max-pixels);
# Pillow's fixed limit would otherwise warn below it and refuse above it.
Image.MAX_IMAGE_PIXELS = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
COLOR_ORDER = "RGB"
DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(Exception):
    """One file that cannot be used as an image; the message says why."""


class TooManyPixels(ImageError):
    """An image whose header claims more pixels than the limit; size is (width, height)."""

    def __init__(self, size, max_pixels):
        super().__init__(too_many_pixels(size, max_pixels))
        self.size = size


def too_many_pixels(size, max_pixels):
    return f"{size[0]}x{size[1]} pixels is over the limit of {max_pixels} (--max-pixels)"


def list_images(root):
    """All image files below root (recursively), sorted, hidden files and folders left out.
    Symbolic links to folders are followed, each real folder once (the first in sorted
    order), so that a link loop ends."""
    if not os.path.isdir(root):
        raise UserError(f"dataset folder not found: {root}")
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += [os.path.join(folder, name) for name in files
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def label_of(path, root):
    """The class of an image is the first folder under the dataset root, however deep the file."""
    relative = os.path.relpath(path, root)
    parts = relative.split(os.sep)
    return parts[0] if len(parts) > 1 else None


def decode_image(path, max_pixels=DEFAULT_MAX_PIXELS, min_side=None):
    """Decode any supported image file (a path, or an in-memory file such as io.BytesIO) into
    an RGB uint8 array of shape (height, width, 3).

    The pixel count is checked from the header before any pixel is decoded, so a tiny file
    that claims a gigantic image is refused (TooManyPixels) instead of filling the memory.
    When min_side is given, JPEGs are decoded at a reduced DCT scale that still keeps both
    sides >= min_side.
    """
    return _decode(path, max_pixels, min_side)[0]


def _decode(source, max_pixels, min_side):
    """decode_image's pixels, and the (width, height) of the file's header."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise TooManyPixels((width, height), max_pixels)
            reduction = _jpeg_reduction(width, height, min_side) if image.format == "JPEG" else 1
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                pixels = _decode_complete_jpeg(image.fp, reduction)
                if pixels is not None:
                    return pixels, (width, height)
            return _decode_with_pillow(image, reduction), (width, height)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(str(error)) from None
    except (OSError, ValueError, SyntaxError) as error:
        if _is_empty(source):
            reason = "empty file"
        elif isinstance(error, Image.UnidentifiedImageError):
            reason = "cannot identify the image format"  # Pillow's message repeats the path
        else:
            reason = str(error) or type(error).__name__
        raise ImageError(reason) from None


def _is_empty(source):
    """Whether source, a path or an in-memory file, holds no bytes at all."""
    if isinstance(source, io.BytesIO):
        return not source.getbuffer().nbytes
    return os.path.exists(source) and os.path.getsize(source) == 0


def _jpeg_reduction(width, height, min_side):
    """The DCT scale (1, 2, 4 or 8) Pillow's draft mode picks to keep both sides >= min_side."""
    if not min_side or min(width, height) < 2 * min_side:
        return 1
    factor = int(min(width, height) / min_side)
    fits = min(width // (width // factor), height // (height // factor))
    return next(reduction for reduction in (8, 4, 2, 1) if reduction <= fits)


_OPENCV_JPEG_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                      4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _decode_complete_jpeg(file, reduction):
    """OpenCV's decoding of a JPEG that ends with its end-of-image marker, else None.

    OpenCV pads a truncated JPEG with grey and only warns on stderr; Pillow refuses it, which
    is what a dataset needs, so files without the marker (or that OpenCV cannot decode) go to
    Pillow. OpenCV applies the EXIF orientation itself, as Pillow's exif_transpose does.
    """
    file.seek(0)
    data = file.read()
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _OPENCV_JPEG_FLAGS[reduction])
    if pixels is None:
        return None
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def _decode_with_pillow(image, reduction):
    if reduction > 1:
        width, height = image.size
        image.draft("RGB", (width // reduction, height // reduction))
    image.seek(0)
    return _to_rgb(ImageOps.exif_transpose(image))


def _to_rgb(image):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: keep the top byte, as 8-bit viewers do.
        gray = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "F":
        gray = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        # Transparent pixels often hold black; product photos expect a white background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize(image, image_size):
    """Squash to a square like the blog; INTER_AREA avoids aliasing when shrinking."""
    return cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)


def load_image(path, image_size, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode and resize one file: exactly what the model expects, as uint8 RGB."""
    return load_image_and_size(path, image_size, max_pixels)[0]


def load_image_bytes(data, image_size, max_pixels=DEFAULT_MAX_PIXELS):
    """load_image for an image held in memory (an upload to serve.py): the same decoding and
    resize, from the bytes themselves, nothing written to disk."""
    return resize(_decode(io.BytesIO(data), max_pixels, min_side=image_size)[0], image_size)


def load_image_and_size(path, image_size, max_pixels=DEFAULT_MAX_PIXELS):
    """load_image's pixels, and the (width, height) of the file's header."""
    pixels, size = _decode(path, max_pixels, min_side=image_size)
    return resize(pixels, image_size), size


def decode_into(image_paths, image_size, store, max_pixels=DEFAULT_MAX_PIXELS, workers=None,
                progress=True):
    """Decode and resize files in parallel (OpenCV and Pillow release the GIL while decoding),
    handing each image to store(position, image, (width, height) of the file) as soon as it
    is ready, so that decoded images are never all held at once.

    Returns (position, reason, size) for every file that could not be used, size being the
    (width, height) of one refused for its pixel count, else None; a progress bar shows
    images/s.
    """
    workers = workers or os.cpu_count() or 1
    # A task per run of files, not per file: a future per image costs, under the GIL, a
    # good part of what a second core gains.
    run_length = 32

    def decode_run(start):
        failures = []
        stop = min(start + run_length, len(image_paths))
        for position in range(start, stop):
            try:
                store(position, *load_image_and_size(image_paths[position], image_size,
                                                     max_pixels))
            except ImageError as error:
                failures.append((position, str(error), getattr(error, "size", None)))
        return failures, stop - start

    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(image_paths), desc="loading images", unit="img",
                 disable=not progress) as bar:
        for run_failures, count in pool.map(decode_run, range(0, len(image_paths), run_length)):
            failures.extend(run_failures)
            bar.update(count)
    return failures


def load_images(image_paths, image_size, max_pixels=DEFAULT_MAX_PIXELS, workers=None,
                progress=True):
    """Load many files into memory, in parallel.

    Returns (images, kept, skipped, sizes): a uint8 array of the images that decoded, the
    indices of those images in image_paths, a list of (path, reason) for the files skipped,
    and the (width, height) of each kept file as decoded.
    """
    array = np.zeros((len(image_paths), image_size, image_size, 3), np.uint8)
    sizes = [None] * len(image_paths)

    def store(position, image, size):
        array[position] = image
        sizes[position] = size

    failures = {position: reason for position, reason, _ in
                decode_into(image_paths, image_size, store, max_pixels, workers, progress)}
    for position, reason in failures.items():
        log.warning("skipped %s: %s", image_paths[position], reason)
    kept = [position for position in range(len(image_paths)) if position not in failures]
    skipped = [(image_paths[position], reason) for position, reason in failures.items()]
    return (array[kept] if failures else array), kept, skipped, [sizes[i] for i in kept]
