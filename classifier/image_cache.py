"""Decoded images kept on disk between runs, and read back without holding them in memory.

Decoding photos is most of a run's start-up time. The first run with a dataset writes every
image, decoded and resized by images.load_image, as one row of a uint8 .npy file, and an
index that keys each row by the file's absolute path, size and modification time and by the
image size, with the pixel count its header claims. A later run decodes only the files that
are new or changed, or that an earlier --max-pixels refused and the current one allows, and
copies the other rows, so with unchanged data it starts training almost at once.

Runs that share a cache folder take turns on each index (an advisory lock of the operating
system), and a data file stays readable to the runs that opened it after another run has
replaced and removed it.

ImageRows reads rows of that file on demand (os.preadv, not a memory map: the operating
system's page cache keeps hot rows, and they do not count as the process's memory), which
is what lets training stream datasets larger than memory.
"""

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import uuid

import numpy as np

from classifier import artifacts, images

log = logging.getLogger(__name__)

CACHE_FORMAT = 2


class ImageRows:
    """Some rows of an N x size x size x 3 uint8 .npy file, indexed like a NumPy array
    (len, shape, an integer, a slice or an array of positions); nothing is read until
    indexed. The file is opened once, and its subsets share it."""

    def __init__(self, path):
        self.path = path
        self.file = open(path, "rb")
        major, _ = np.lib.format.read_magic(self.file)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        self.file_shape = read_header(self.file)[0]
        self.offset = self.file.tell()
        self.rows = np.arange(self.file_shape[0])
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
        for slot, row in enumerate(rows):
            os.preadv(self.file.fileno(), [out[slot]], self.offset + int(row) * self.row_bytes)
        return out

    def subset(self, positions):
        """The rows at these positions, still on disk."""
        part = copy.copy(self)
        part.rows = self.rows[positions]
        return part

    def load(self):
        """All the rows as one array in memory."""
        return self[slice(None)]


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
    Returns (rows, kept, skipped, sizes): an ImageRows over the images that decoded within
    max_pixels, their indices in image_paths, (path, reason) for each file skipped, and the
    (width, height) of each kept file as decoded.
    Files that failed to decode are remembered too, and not retried until they change.
    """
    os.makedirs(cache_dir, exist_ok=True)
    index_path = os.path.join(cache_dir, f"{name}-{image_size}px.json")
    keys = [file_key(path) for path in image_paths]
    with _turn(index_path):
        previous = _read_index(index_path, image_size)
        if previous and previous["keys"] == keys and not _to_decode(previous, max_pixels):
            log.info("all %d images from the cache in %s", len(keys), cache_dir)
            index = previous
        else:
            index = _rebuild(image_paths, keys, image_size, cache_dir, name, previous,
                             max_pixels, workers, progress)
            artifacts.write_json(index_path, index)
            if previous:  # only now: until the new index is in place, it is the cache
                os.remove(os.path.join(cache_dir, previous["data"]))
        rows = ImageRows(os.path.join(cache_dir, index["data"]))
    reasons = [_reason(reason, size, max_pixels)
               for reason, size in zip(index["reasons"], index["sizes"])]
    kept = [position for position, reason in enumerate(reasons) if reason is None]
    skipped = [(image_paths[position], reason) for position, reason in enumerate(reasons)
               if reason is not None]
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return rows.subset(kept), kept, skipped, [tuple(index["sizes"][i]) for i in kept]


@contextlib.contextmanager
def _turn(index_path):
    """This run's turn on the cache behind index_path, while other runs wait for theirs."""
    with open(index_path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run to finish with the cache %s", index_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _reason(reason, size, max_pixels):
    """Why a cached file is not used now, or None: a row was decoded (reason None) or its
    header was refused for its pixel count (size known), and max_pixels decides anew."""
    if size is not None and size[0] * size[1] > max_pixels:
        return images.too_many_pixels(size, max_pixels)
    return None if size is not None else reason


def _to_decode(index, max_pixels):
    """Whether a file refused for its pixel count is now within max_pixels."""
    return any(reason is not None and size is not None and size[0] * size[1] <= max_pixels
               for reason, size in zip(index["reasons"], index["sizes"]))


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
    """Write a new data file: rows decoded before copied from the previous one, the others
    decoded; return its index. A file's reason is None when its row holds it; its size is
    its header's (width, height) when that is known (decoded, or refused for it)."""
    data_path = os.path.join(cache_dir, f"{name}-{image_size}px-{uuid.uuid4().hex[:12]}.npy")
    shape = (len(image_paths), image_size, image_size, 3)
    # open_memmap writes the .npy header and sizes the file; rows are then written with
    # pwrite, so the dataset never has to fit in memory.
    np.lib.format.open_memmap(data_path, mode="w+", dtype=np.uint8, shape=shape).flush()
    target = ImageRows(data_path)
    old_rows = {}
    if previous:
        old = ImageRows(os.path.join(cache_dir, previous["data"]))
        old_rows = {tuple(key): (row, reason, size) for row, (key, reason, size) in enumerate(
            zip(previous["keys"], previous["reasons"], previous["sizes"]))}
    reasons, sizes = [None] * len(image_paths), [None] * len(image_paths)
    to_decode = []
    descriptor = os.open(data_path, os.O_WRONLY)
    try:
        def store(index, image, size):
            os.pwrite(descriptor, image.tobytes(), target.offset + index * target.row_bytes)
            sizes[index] = size

        for index, key in enumerate(keys):
            row, reasons[index], sizes[index] = old_rows.get(tuple(key), (None, "new", None))
            if reasons[index] is None:
                store(index, old[row], sizes[index])
            elif row is None or (sizes[index] and sizes[index][0] * sizes[index][1] <= max_pixels):
                to_decode.append(index)
        if len(to_decode) < len(keys):
            log.info("%d of %d images from the cache, decoding %d new or changed",
                     len(keys) - len(to_decode), len(keys), len(to_decode))
        for index in to_decode:
            reasons[index] = None
        failures = images.decode_into(
            [image_paths[index] for index in to_decode], image_size,
            lambda position, image, size: store(to_decode[position], image, size),
            max_pixels, workers, progress)
        for position, reason, size in failures:
            reasons[to_decode[position]], sizes[to_decode[position]] = reason, size
    except BaseException:
        os.close(descriptor)
        os.remove(data_path)
        raise
    os.close(descriptor)
    return {"format": CACHE_FORMAT, "image_size": image_size,
            "data": os.path.basename(data_path), "keys": keys, "reasons": reasons,
            "sizes": sizes}
