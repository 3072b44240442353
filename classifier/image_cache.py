"""Decoded images kept on disk between runs, and read back without holding them in memory.

Decoding photos is most of a run's start-up time. The first run with a dataset writes every
image, decoded and resized by images.load_image, as one row of a uint8 .npy file, and an
index that keys each row by the file's absolute path, size and modification time and by the
image size. A later run decodes only the files that are new or changed and copies the other
rows, so with unchanged data it starts training almost at once.

ImageRows reads rows of that file on demand (os.preadv, not a memory map: the operating
system's page cache keeps hot rows, and they do not count as the process's memory), which
is what lets training stream datasets larger than memory.
"""

import hashlib
import json
import logging
import os
import uuid

import numpy as np

from classifier import artifacts, images

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


class ImageRows:
    """Some rows of an N x size x size x 3 uint8 .npy file, indexed like a NumPy array
    (len, shape, an integer or an array of positions); nothing is read until indexed."""

    def __init__(self, path, rows=None):
        header = np.load(path, mmap_mode="r")
        self.path, self.offset, self.file_shape = path, header.offset, header.shape
        del header
        self.rows = np.arange(self.file_shape[0]) if rows is None else np.asarray(rows)
        self.row_bytes = int(np.prod(self.file_shape[1:]))

    @property
    def shape(self):
        return (len(self.rows), *self.file_shape[1:])

    @property
    def size(self):
        return len(self.rows) * self.row_bytes

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, positions):
        if np.isscalar(positions):
            return self[np.array([positions])][0]
        rows = self.rows[positions]
        out = np.empty((len(rows), *self.file_shape[1:]), np.uint8)
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            for slot, row in enumerate(rows):
                os.preadv(descriptor, [out[slot]], self.offset + int(row) * self.row_bytes)
        finally:
            os.close(descriptor)
        return out

    def subset(self, positions):
        """The rows at these positions, still on disk."""
        return ImageRows(self.path, self.rows[positions])

    def load(self):
        """All the rows as one array in memory."""
        return np.load(self.path, mmap_mode="r")[self.rows]


def file_key(path):
    status = os.stat(path)
    return [os.path.abspath(path), status.st_size, status.st_mtime_ns]


def folder_name(root):
    """A cache name for a dataset folder: readable, and distinct for folders of one name."""
    absolute = os.path.abspath(root)
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(absolute))
    return f"{readable or 'root'}-{hashlib.sha1(absolute.encode()).hexdigest()[:8]}"


def load_images(image_paths, image_size, cache_dir, max_pixels=images.DEFAULT_MAX_PIXELS,
                workers=None, progress=True, name="images"):
    """Like images.load_images, through the cache in cache_dir.

    Each name (one per dataset folder, see folder_name) has its own files in cache_dir.
    Returns (rows, kept, skipped): an ImageRows over the images that decoded, their indices
    in image_paths, and (path, reason) for each file skipped. Files that failed to decode
    are remembered too, and not retried until they change.
    """
    os.makedirs(cache_dir, exist_ok=True)
    index_path = os.path.join(cache_dir, f"{name}-{image_size}px.json")
    keys = [file_key(path) for path in image_paths]
    previous = _read_index(index_path, image_size)
    if previous and previous["keys"] == keys:
        log.info("all %d images from the cache in %s", len(keys), cache_dir)
        data_path = os.path.join(cache_dir, previous["data"])
        reasons = previous["reasons"]
    else:
        data_path, reasons = _rebuild(image_paths, keys, image_size, cache_dir, name, previous,
                                      max_pixels, workers, progress)
        old_data = previous and os.path.join(cache_dir, previous["data"])
        artifacts.write_json(index_path, {
            "format": CACHE_FORMAT, "image_size": image_size,
            "data": os.path.basename(data_path), "keys": keys, "reasons": reasons})
        if old_data and os.path.exists(old_data):
            os.remove(old_data)  # only now: until the new index is in place, it is the cache
    kept = [index for index, reason in enumerate(reasons) if reason is None]
    skipped = [(image_paths[index], reason) for index, reason in enumerate(reasons)
               if reason is not None]
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return ImageRows(data_path, kept), kept, skipped


def _read_index(index_path, image_size):
    try:
        with open(index_path) as handle:
            index = json.load(handle)
        if index.get("format") != CACHE_FORMAT or index.get("image_size") != image_size:
            return None
        ImageRows(os.path.join(os.path.dirname(index_path), index["data"]))
        return index
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache yet, or one from another version or cut short: start over


def _rebuild(image_paths, keys, image_size, cache_dir, name, previous, max_pixels, workers,
             progress):
    """Write a new data file: unchanged rows copied from the previous one, the rest decoded."""
    data_path = os.path.join(cache_dir, f"{name}-{image_size}px-{uuid.uuid4().hex[:12]}.npy")
    shape = (len(image_paths), image_size, image_size, 3)
    # open_memmap writes the .npy header and sizes the file; rows are then written with
    # pwrite, so the dataset never has to fit in memory.
    np.lib.format.open_memmap(data_path, mode="w+", dtype=np.uint8, shape=shape).flush()
    target = ImageRows(data_path)
    old_rows = {}
    if previous:
        old = ImageRows(os.path.join(cache_dir, previous["data"]))
        old_rows = {tuple(key): (row, reason) for row, (key, reason)
                    in enumerate(zip(previous["keys"], previous["reasons"]))}
    reasons = [None] * len(image_paths)
    to_decode = []
    descriptor = os.open(data_path, os.O_WRONLY)
    try:
        def store(index, image):
            os.pwrite(descriptor, image.tobytes(), target.offset + index * target.row_bytes)

        for index, key in enumerate(keys):
            hit = old_rows.get(tuple(key))
            if hit is None:
                to_decode.append(index)
            elif hit[1] is not None:
                reasons[index] = hit[1]
            else:
                store(index, old[hit[0]])
        if len(to_decode) < len(keys):
            log.info("%d of %d images from the cache, decoding %d new or changed",
                     len(keys) - len(to_decode), len(keys), len(to_decode))
        failures = images.decode_into(
            [image_paths[index] for index in to_decode], image_size,
            lambda position, image: store(to_decode[position], image),
            max_pixels, workers, progress)
        for position, reason in failures:
            reasons[to_decode[position]] = reason
    except BaseException:
        os.close(descriptor)
        os.remove(data_path)
        raise
    os.close(descriptor)
    return data_path, reasons

