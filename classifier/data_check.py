"""The data check that runs before training: copies of one photo (identical, or resized,
re-encoded, mirrored, cropped by a few percent), copies filed under different labels, copies
across the parts of a pre-split dataset, and what else makes a folder hard to learn from
(rare or tiny classes, images much smaller than --image-size, extreme aspect ratios,
grayscale images among colour ones). It reports; the one thing it changes is the split:
dataset.split keeps each group of copies within one part.

How copies are found. Each image, as the model sees it (decoded and resized, from the
cache), becomes a 24x24 thumbnail in CIE Lab colour. The nearest thumbnails of each one, and
of its mirror image, are found with a k-d tree (scikit-learn) over a short summary of them,
so the cost grows as n log n, not with the pairs. A candidate pair is a copy when its
thumbnails differ by less than NEAR on average (Lab units: L runs 0..100), at the best of a
few centred crops. Colour is part of the distance, so a red shirt and the same shirt in
blue are not copies. Why not a perceptual hash such as imagehash's: measured on
clothing-dataset-small, a 64-bit difference hash puts photos cropped by 3% a side up to 13
bits from their original, and 6,753 pairs of different photos within 10 bits of each other;
a threshold that finds the crops finds mostly false copies (docs/data.md).
"""

import dataclasses
import hashlib
import logging

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

log = logging.getLogger(__name__)

THUMBNAIL = 24
# Mean absolute Lab difference under which two thumbnails are one photo: copies resized,
# re-encoded, mirrored or cropped by 3% measured 0.0 to 0.94, different photos of
# clothing-dataset-small at least 2.03 (docs/data.md).
NEAR = 1.5
# Pairs closer than this at full frame are compared again at CROPS: a few percent cut off
# each side of one of the two.
CROP_SEARCH = 6.0
CROPS = (0.03, 0.06)
NEIGHBOURS = 6
SUMMARY_GRID = 6  # the summary the tree searches: 6x6 Lab means ...
SUMMARY_SIZE = 16  # ... reduced to this many numbers
TINY_CLASS = 10  # fewer images than this in a class: hard to learn and to test
RARE_CLASS = 0.2  # a class under this share of the largest: --class-weight balanced
SMALL_IMAGE = 0.5  # a side under this share of --image-size: upscaled, blurred
EXTREME_ASPECT = 3.0  # squashed into a square, a shape this long is hard to recognise
GRAY_CHROMA = 2.0  # a thumbnail whose colour (Lab a, b) never leaves +-this is grayscale
PARTS = ("train", "validation", "test")


@dataclasses.dataclass
class Record:
    """An image the check looked at: its file, the part of the dataset it came from (the
    folder it was given in: train for --dataset), its label(s) as text and its (width,
    height)."""
    path: str
    part: str
    label: str
    size: tuple


@dataclasses.dataclass
class Findings:
    """What the check found. groups: the positions (into records) of each group of two or
    more copies, exact[g] whether group g's images are identical; conflicts: the groups
    whose copies carry different labels; leaks: positions of images given as validation
    or test images that have a copy in another part."""
    records: list
    groups: list
    exact: list
    conflicts: list
    leaks: list
    class_counts: dict
    tiny_classes: list
    rare_classes: list
    small_images: list
    extreme_aspect: list
    grayscale: list
    image_size: int
    multi_label: bool = False

    def group_numbers(self, part):
        """A group number for each image of part, in order: copies share one, every other
        image has its own (dataset.split)."""
        numbers = {}
        for number, members in enumerate(self.groups):
            for member in members:
                numbers[member] = number
        positions = [index for index, record in enumerate(self.records) if record.part == part]
        return np.array([numbers.get(index, len(self.groups) + index) for index in positions])

    def copies_within(self, part):
        """Whether some group of copies lies wholly in part."""
        return any(all(self.records[member].part == part for member in members)
                   for members in self.groups)

    def leaked(self, part):
        """Positions within part of its images that have a copy in another part."""
        positions = [index for index, record in enumerate(self.records) if record.part == part]
        leaks = set(self.leaks)
        return np.array([at for at, index in enumerate(positions) if index in leaks], dtype=int)

    def summary(self):
        """One line for the log."""
        copies = sum(len(members) for members in self.groups)
        parts = [f"{len(self.records):,} images", f"{len(self.groups)} group"
                 f"{'' if len(self.groups) == 1 else 's'} of copies ({copies} images, "
                 f"{len(self.conflicts)} with conflicting labels)"]
        if self.leaks:
            parts.append(f"{len(self.leaks)} validation/test images with a copy in another part")
        for name, found in (("tiny classes", self.tiny_classes),
                            ("rare classes", self.rare_classes),
                            ("small images", self.small_images),
                            ("extreme aspect ratios", self.extreme_aspect),
                            ("grayscale images", self.grayscale)):
            if found:
                parts.append(f"{len(found)} {name}")
        return "data check: " + ", ".join(parts)


def records_of(folders, multi_label):
    """A Record per image of the dataset.Folder of each part ({"train": ..., ...}), parts in
    the order train, validation, test: the order check() numbers them in."""
    records = []
    for part in PARTS:
        if part in folders:
            folder = folders[part]
            records += [Record(path, part, ";".join(label) if multi_label else str(label),
                               tuple(size)) for path, label, size in
                        zip(folder.paths, folder.labels, folder.sizes)]
    return records


def images_of(folders):
    """The images of every part, in records_of's order, as one indexable sequence."""
    return _Chain([folders[part].images for part in PARTS if part in folders])


class _Chain:
    """Several image arrays (or image_cache.ImageRows) indexed as one, without a copy."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - self.starts[part]]

    def batches(self, size):
        for part in self.parts:
            for start in range(0, len(part), size):
                yield part[start:start + size]


def check(records, pictures, image_size, multi_label=False):
    """Findings for the images pictures (as the model sees them, in records' order)."""
    thumbnails, fingerprints = _thumbnails(pictures)
    pairs = _exact_pairs(fingerprints) + _near_pairs(thumbnails, pictures)
    groups = _groups(pairs, len(records))
    exact = [len({fingerprints[member] for member in members}) == 1 for members in groups]
    conflicts = [number for number, members in enumerate(groups)
                 if len({records[member].label for member in members}) > 1]
    leaks = sorted(member for members in groups for member in members
                   if records[member].part != "train"
                   and any(records[other].part != records[member].part for other in members))
    counts = _class_counts(records)
    largest = max(counts.values(), default=0)
    chroma = np.abs(thumbnails[..., 1:]).reshape(len(records), -1).max(axis=1)
    grayscale = np.flatnonzero(chroma < GRAY_CHROMA)
    return Findings(
        records, groups, exact, conflicts, leaks, counts,
        tiny_classes=[name for name, count in counts.items() if count < TINY_CLASS],
        rare_classes=[name for name, count in counts.items() if count < RARE_CLASS * largest],
        small_images=[index for index, record in enumerate(records)
                      if min(record.size) < SMALL_IMAGE * image_size],
        extreme_aspect=[index for index, record in enumerate(records)
                        if max(record.size) > EXTREME_ASPECT * min(record.size)],
        # Only worth saying among colour photos: in a grayscale dataset it is the norm.
        grayscale=([int(index) for index in grayscale] if len(grayscale) < len(records) / 2
                   else []),
        image_size=image_size, multi_label=multi_label)


def _class_counts(records):
    counts = {}
    for record in records:
        if record.part == "train":
            for name in record.label.split(";"):
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def thumbnail(picture, crop=0.0):
    """A uint8 RGB image as a THUMBNAIL-square float32 Lab image, crop of its side cut off
    each edge first."""
    side = picture.shape[0]
    cut = int(round(side * crop))
    small = cv2.resize(picture[cut:side - cut, cut:side - cut], (THUMBNAIL, THUMBNAIL),
                       interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)


def _thumbnails(pictures, batch=1024):
    """The float16 thumbnail of each picture, and a fingerprint of its pixels (equal
    fingerprints: identical images)."""
    thumbnails = np.empty((len(pictures), THUMBNAIL, THUMBNAIL, 3), np.float16)
    fingerprints = []
    at = 0
    for block in pictures.batches(batch):
        for picture in block:
            thumbnails[at] = thumbnail(picture)
            fingerprints.append(hashlib.blake2b(picture.tobytes(), digest_size=16).digest())
            at += 1
    return thumbnails, fingerprints


def _exact_pairs(fingerprints):
    first = {}
    pairs = []
    for index, fingerprint in enumerate(fingerprints):
        if fingerprint in first:
            pairs.append((first[fingerprint], index))
        else:
            first[fingerprint] = index
    return pairs


def _near_pairs(thumbnails, pictures):
    """Pairs of positions whose images are copies: candidates from the nearest neighbours
    of each thumbnail and of its mirror image, kept when close enough (NEAR)."""
    count = len(thumbnails)
    if count < 2:
        return []
    mirrored = thumbnails[:, :, ::-1]
    summaries = np.concatenate([_summary(thumbnails), _summary(mirrored)])
    reduced = PCA(n_components=min(SUMMARY_SIZE, *summaries.shape),
                  random_state=0).fit_transform(summaries)
    tree = NearestNeighbors(n_neighbors=min(NEIGHBOURS + 1, len(reduced)),
                            algorithm="kd_tree").fit(reduced)
    _, neighbours = tree.kneighbors(reduced[:count])
    candidates = {(min(first, other % count), max(first, other % count), other >= count)
                  for first, row in enumerate(neighbours) for other in row
                  if other % count != first}
    if not candidates:
        return []
    first, second, flipped = (np.array(column) for column in zip(*sorted(candidates)))
    distance = np.empty(len(first), np.float32)
    for start in range(0, len(first), 4096):  # in blocks: a few MB of float32 at a time
        part = slice(start, start + 4096)
        other = np.where(flipped[part, None, None, None], mirrored[second[part]],
                         thumbnails[second[part]]).astype(np.float32)
        distance[part] = np.abs(thumbnails[first[part]].astype(np.float32) - other).mean(
            axis=(1, 2, 3))
    pairs = [(int(a), int(b)) for a, b, d in zip(first, second, distance) if d < NEAR]
    search = np.flatnonzero((NEAR <= distance) & (distance < CROP_SEARCH))
    searched = np.union1d(first[search], second[search])
    crops = np.stack([crop_thumbnails(pictures[int(index)]) for index in searched]) \
        if len(searched) else None
    for start in range(0, len(search), 4096):
        part = search[start:start + 4096]
        row_a, row_b = (np.searchsorted(searched, side[part]) for side in (first, second))
        other = np.where(flipped[part, None, None, None], mirrored[second[part]],
                         thumbnails[second[part]]).astype(np.float32)
        other_crops = np.where(flipped[part, None, None, None, None],
                               crops[row_b][:, :, :, ::-1], crops[row_b])
        close = cropped_distance(thumbnails[first[part]].astype(np.float32), crops[row_a],
                                 other, other_crops) < NEAR
        pairs += [(int(a), int(b)) for a, b in zip(first[part][close], second[part][close])]
    return pairs


def _summary(thumbnails):
    """SUMMARY_GRID x SUMMARY_GRID Lab means of each thumbnail, as rows of numbers."""
    cell = THUMBNAIL // SUMMARY_GRID
    return thumbnails.astype(np.float32).reshape(
        len(thumbnails), SUMMARY_GRID, cell, SUMMARY_GRID, cell, 3).mean(axis=(2, 4)).reshape(
        len(thumbnails), -1)


def crop_thumbnails(picture):
    """The thumbnails of picture cropped by each of CROPS, stacked."""
    return np.stack([thumbnail(picture, crop) for crop in CROPS])


def cropped_distance(first, first_crops, second, second_crops):
    """The smallest distance between one image's thumbnail and the other's cropped ones,
    either way round, for each pair (rows of thumbnails, and of their crop_thumbnails): a
    copy cropped by a few percent is close to one of them."""
    def apart(whole, cropped):
        return np.abs(cropped - whole[:, None]).mean(axis=(2, 3, 4)).min(axis=1)
    return np.minimum(apart(second, first_crops), apart(first, second_crops))


def _groups(pairs, count):
    """The connected groups of two or more positions that pairs join, each sorted."""
    if not pairs:
        return []
    first, second = zip(*pairs)
    graph = coo_matrix((np.ones(len(pairs)), (first, second)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    members = {}
    for index in np.flatnonzero(sizes[component] > 1):
        members.setdefault(component[index], []).append(int(index))
    return sorted(members.values())
