"""The dataset: which images there are, their labels, and the splits to train, validate and
test on.

A class is the first folder under the dataset root (images.label_of); with --multi-label its
name is split into labels, or the labels come from a CSV file. Images are decoded and resized
once, through the cache (image_cache) unless --no-cache, and stay uint8: as arrays in memory,
or as image_cache.ImageRows read from the cache batch by batch.
"""

import csv
import hashlib
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from classifier import artifacts, image_cache, images
from classifier.cli import UserError

log = logging.getLogger("dataset")

SKIPPED_FILE = "skipped_files.csv"
SPLIT_FILE = "split.csv"


@dataclass(frozen=True)
class Labelling:
    """Where labels come from: a class per first folder, or with multi_label several labels
    per image, from the folder name split on label_separator or from labels_csv (path,labels
    rows, labels split on csv_label_separator)."""
    multi_label: bool = False
    label_separator: str = "_"
    labels_csv: str = None
    csv_label_separator: str = ";"


@dataclass(frozen=True)
class Decoding:
    """How files become images: resized to image_size x image_size, refused above
    max_pixels, decoded by workers threads and kept in cache_dir (None: no cache)."""
    image_size: int
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    workers: int = 1
    cache_dir: str = None


@dataclass
class Folder:
    """The usable images of one dataset folder, their labels (class names, or with
    --multi-label tuples of label names), files and (width, height) as decoded."""
    images: object  # a uint8 array, or image_cache.ImageRows
    labels: object
    paths: list
    sizes: list


@dataclass
class Split:
    """Images (uint8: an array, or image_cache.ImageRows), their targets (one column per
    class) and files."""
    x: object
    y: np.ndarray
    paths: list


@dataclass
class Splits:
    train: Split
    validation: Split  # the test split itself unless --val-dir or --val-size, as in the blog
    test: Split
    has_validation: bool  # a validation part of its own


def load_folders(roots, labelling, decoding, seed):
    """The images and labels of each of roots ({"train": --dataset, "validation": --val-dir,
    "test": --test-dir}, None where not given), each shuffled with seed: ({"train": Folder,
    "validation": ..., "test": ...}, the files that could not be used as (path, reason))."""
    loaded, skipped, found = {}, [], 0
    for role, root in roots.items():
        if root:
            labels_csv = labelling.labels_csv if role == "train" else None
            folder, unusable, listed = load_folder(root, labelling, decoding, seed, labels_csv)
            loaded[role] = folder
            skipped += unusable
            found += listed
    if skipped:
        log.warning("skipped %d of %d files that could not be read as images (listed in %s)",
                    len(skipped), found, SKIPPED_FILE)
    check_classes(loaded, roots, labelling)
    return loaded, skipped


def save_skipped(skipped, output):
    """output/skipped_files.csv: each file that could not be used, and why."""
    artifacts.write_csv(os.path.join(output, SKIPPED_FILE), ["path", "reason"], skipped)


def split_rows(splits, classes):
    """(path, label(s), part) for every image the splits use; several labels joined by
    ";". When the test split doubles as validation data, its images are test images."""
    parts = [("train", splits.train), ("test", splits.test)]
    if splits.has_validation:
        parts.insert(1, ("validation", splits.validation))
    return [(path, ";".join(classes[index] for index in np.flatnonzero(target)), part)
            for part, split in parts for path, target in zip(split.paths, split.y)]


def save_split(rows, output):
    """output/split.csv from split_rows: anyone can check the split, and repeat it."""
    artifacts.write_csv(os.path.join(output, SPLIT_FILE), ["path", "labels", "part"], rows)


def check_same_split(rows, output):
    """Refuse to resume a run whose images or split are no longer those it started with
    (files added, removed or moved since): it would test on images it trained on."""
    try:
        with open(os.path.join(output, SPLIT_FILE), newline="", encoding="utf-8") as handle:
            before = {tuple(row) for row in list(csv.reader(handle))[1:]}
    except FileNotFoundError:
        return
    if before != {tuple(row) for row in rows}:
        raise UserError(f"the images or their split differ from those of the interrupted run "
                        f"({os.path.join(output, SPLIT_FILE)}): restore them, or add --fresh "
                        "to start over")


def check_classes(loaded, roots, labelling):
    classes = label_names(loaded["train"].labels, labelling.multi_label)
    if len(classes) < 2:
        if labelling.multi_label:
            raise UserError(f"need at least 2 labels in {labelling.labels_csv or roots['train']}"
                            f", found {len(classes)}")
        raise UserError(f"need images in at least 2 class folders of {roots['train']}, found "
                        f"{len(classes)}")
    for role in ("validation", "test"):
        unknown = (label_names(loaded[role].labels, labelling.multi_label) - classes
                   if role in loaded else set())
        if unknown:
            raise UserError(f"{roots[role]} has classes that {roots['train']} has not: "
                            f"{', '.join(sorted(unknown))}")


def label_names(labels, multi_label):
    """Every class (label) name that labels use."""
    return {name for names in labels for name in names} if multi_label else set(labels)


def load_folder(root, labelling, decoding, seed, labels_csv=None):
    """(Folder, skipped files, files found) for one folder of class sub-folders, or for the
    images that labels_csv lists."""
    missing = []
    if labels_csv:
        listed = read_labels_csv(labels_csv, root, labelling.csv_label_separator)
        missing = [(path, f"listed in {labels_csv} but not found")
                   for path in listed if not os.path.isfile(path)]
        image_paths = sorted(path for path in listed if os.path.isfile(path))
    else:
        image_paths = [path for path in images.list_images(root) if images.label_of(path, root)]
        folders = {entry.name for entry in os.scandir(root)
                   if entry.is_dir() and not entry.name.startswith(".")}
        for empty in sorted(folders - {images.label_of(path, root) for path in image_paths}):
            log.warning("class folder %s holds no images: ignored", os.path.join(root, empty))
    if not image_paths:
        where = labels_csv or f"class sub-folders of {root}"
        raise UserError(f"no images found in {where}")
    random.Random(seed).shuffle(image_paths)
    log.info("found %d images in %s", len(image_paths), root)

    if decoding.cache_dir is None:
        data, kept, skipped, sizes = images.load_images(
            image_paths, decoding.image_size, decoding.max_pixels, workers=decoding.workers)
    else:
        data, kept, skipped, sizes = image_cache.load_images(
            image_paths, decoding.image_size, decoding.cache_dir, decoding.max_pixels,
            workers=decoding.workers, name=image_cache.folder_name(root))
    if labels_csv:
        labels = [listed[image_paths[i]] for i in kept]
    elif labelling.multi_label:
        labels = [split_label(images.label_of(image_paths[i], root), labelling.label_separator)
                  for i in kept]
    else:
        labels = np.array([images.label_of(image_paths[i], root) for i in kept])
    return (Folder(data, labels, [image_paths[i] for i in kept], sizes), missing + skipped,
            len(image_paths) + len(missing))


def split_label(folder_name, separator):
    """black_dress -> ("black", "dress")."""
    return tuple(sorted({name.strip() for name in folder_name.split(separator) if name.strip()}))


def read_labels_csv(path, root, separator):
    """{image path: tuple of labels} from a CSV file of path,labels rows (a header row of
    exactly path,labels is skipped); relative image paths are taken from root."""
    rows = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            for row in reader:
                if not row or (reader.line_num == 1 and
                               [cell.strip().lower() for cell in row] == ["path", "labels"]):
                    continue
                if len(row) != 2:
                    raise UserError(f"{path}, line {reader.line_num}: expected 2 columns "
                                    f"(path,labels), found {len(row)}")
                image_path = os.path.normpath(os.path.join(root, row[0].strip()))
                rows[image_path] = split_label(row[1], separator)
    except OSError as error:
        raise UserError(f"cannot read the labels file {path}: {error.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} is not a CSV file of path,labels rows: {error}") from None
    return rows


def size_in_bytes(loaded):
    """What the uint8 images of every folder would take in memory."""
    return sum(folder.images.size for folder in loaded.values())


def split(loaded, binarizer, targets, test_size, seed, in_memory, val_size=0.0, groups=None):
    """The training, validation and test splits: the test split is held out of --dataset
    unless --test-dir gives it; the validation split is --val-dir, or val_size of --dataset
    held out of what is left for training, or else the test split itself, as in the blog.
    targets are the binarized labels of --dataset; groups, a group number per image of
    --dataset (copies of one photo share one, data_check.py), keep each group in one part;
    the images end up in memory, or still on disk when not in_memory."""
    train = loaded["train"]
    # With several labels per image, each combination of labels is a stratum.
    strata = np.array([str(label) for label in train.labels])
    groups = np.arange(len(strata)) if groups is None else np.asarray(groups)
    train_at = np.arange(len(strata))

    def part(positions):
        return Split(take(train.images, positions, in_memory), targets[positions],
                     [train.paths[i] for i in positions])

    if "test" in loaded:
        test = own_split(loaded["test"], binarizer, in_memory)
    else:
        train_at, test_at = grouped_split(train_at, strata, groups, test_size, seed)
        test = part(test_at)
    validation = None
    if "validation" in loaded:
        validation = own_split(loaded["validation"], binarizer, in_memory)
    elif val_size:
        train_at, val_at = grouped_split(train_at, strata, groups, round(val_size * len(strata)),
                                         seed)
        validation = part(val_at)
    if len(train_at) == len(strata):  # all of --dataset: no copy in memory
        training = Split(take(train.images, slice(None), in_memory), targets, train.paths)
    else:
        training = part(train_at)
    if validation is None:
        return Splits(training, test, test, False)
    return Splits(training, validation, test, True)


def grouped_split(positions, strata, groups, size, seed):
    """stratified_split of positions (indices into strata and groups), each group kept whole
    on one side: the first image of a group stands for it, the others follow it. Without
    groups of two or more, exactly stratified_split's split."""
    first = {}
    for position in positions:
        first.setdefault(groups[position], position)
    leaders = np.array(list(first.values()))
    if len(leaders) == len(positions):
        return stratified_split(positions, strata[positions], size, seed)
    if not isinstance(size, float):  # a count of images: scale it to the groups
        size = max(1, round(size * len(leaders) / len(positions)))
    members = {}
    for position in positions:
        members.setdefault(groups[position], []).append(position)
    kept, held = stratified_split(leaders, strata[leaders], size, seed)
    return tuple(np.array([member for leader in side for member in members[groups[leader]]],
                          dtype=int) for side in (kept, held))


def stratified_split(positions, strata, size, seed):
    """positions split into (kept, held out), size of them held out (a fraction, or a count),
    stratified by strata; a plain random split when some stratum is too small."""
    try:
        return train_test_split(positions, test_size=size, random_state=seed, stratify=strata)
    except ValueError as error:
        log.warning("cannot stratify the split (%s); splitting at random", error)
        return train_test_split(positions, test_size=size, random_state=seed)


def own_split(folder, binarizer, in_memory):
    """A folder given as its own split: its images and one-hot labels."""
    return Split(take(folder.images, slice(None), in_memory),
                 artifacts.one_hot(binarizer, folder.labels), folder.paths)


def take(data, positions, in_memory):
    """The images at positions (an index array, or slice(None) for all: no copy in memory)."""
    if isinstance(data, np.ndarray):
        return data[positions]
    part = data.subset(positions)
    return part.load() if in_memory else part


class AtSizes:
    """part_at(name, size): the part of splits called name ("train", ...) at size x size;
    splits' own at their size, others decoded by at_size(decoding_at(size)) and kept at one
    other size at a time (each is a copy in memory)."""

    def __init__(self, splits, size, decoding_at):
        self.splits, self.size, self.decoding_at = splits, size, decoding_at
        self.resized = {}

    def __call__(self, name, size):
        if size == self.size:
            return getattr(self.splits, name)
        if (name, size) not in self.resized:
            self.resized = {key: part for key, part in self.resized.items() if key[1] == size}
            self.resized[name, size] = at_size(getattr(self.splits, name),
                                               self.decoding_at(size))
        return self.resized[name, size]


def at_size(part, decoding):
    """part (a Split) with its images decoded at decoding.image_size instead, in memory,
    through the cache under a name of their own: its files are those images, and no folder's
    own entry is replaced."""
    if decoding.cache_dir is None:
        data, kept, _, _ = images.load_images(part.paths, decoding.image_size,
                                              decoding.max_pixels, workers=decoding.workers)
    else:
        data, kept, _, _ = image_cache.load_images(
            part.paths, decoding.image_size, decoding.cache_dir, decoding.max_pixels,
            workers=decoding.workers, name="part-" + hashlib.blake2b(
                "\n".join(part.paths).encode("utf-8"), digest_size=8).hexdigest())
        data = data.load()
    if len(kept) != len(part.paths):
        raise UserError(f"{len(part.paths) - len(kept)} images could no longer be read: were "
                        "they changed during the run?")
    return Split(data, part.y, part.paths)


def class_weights(train_y, classes):
    """scikit-learn's balanced weights, {class index: weight}: each class's loss weighed by
    its rarity in the training split."""
    present = train_y.argmax(axis=1)
    weights = compute_class_weight("balanced", classes=np.unique(present), y=present)
    weighed = {int(index): float(weight) for index, weight in zip(np.unique(present), weights)}
    log.info("class weights: %s", ", ".join(
        f"{classes[index]} {weight:.2f}" for index, weight in weighed.items()))
    return weighed
