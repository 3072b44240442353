"""Train the blog's VGG-style classifier on a folder of images, one sub-folder per class.

    python train.py --dataset Dataset

Reads every image below the dataset folder (the class is the first folder under it; with
--multi-label its name split into labels, or the labels come from --labels-csv), holds out a
stratified test split, trains with ImageDataGenerator augmentation, and leaves in the
output folder: vgg_model.keras, labels.pickle and labels.json, checkpoints/, history.csv,
config.json, and the reports (reports.py): classification_report.txt and .json,
confusion_matrix.png, training_plot.png, dataset_overview.png, confident_mistakes.png, all
on one page, report.html. TensorBoard events go to logs/<run name>.
"""

import argparse
import csv
import functools
import glob
import json
import logging
import math
import os
import random
import shutil
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO chatter; warnings stay

import keras
import numpy as np
import tensorflow as tf
import yaml
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from tensorflow.keras.preprocessing.image import ImageDataGenerator

import artifacts
import distributed
import image_cache
import images
import reports
import vgg

log = logging.getLogger("train")

CHECKPOINT_PATTERN = "VGG_epoch-{epoch:02d}_loss-{loss:.4f}_val_loss-{val_loss:.4f}.keras"
HISTORY_FILE = "history.csv"
BACKUP_DIR = "backup"
# Settings that may change between an interrupted run and its resumption.
NOT_RESUME_RELEVANT = {"epochs", "run_name", "fresh", "verbose", "workers", "logs", "cache_dir",
                       "no_cache", "data_mode", "config", "early_stopping", "strategy", "devices",
                       "worker_addresses", "worker_index"}
# Keras dtype policies behind --precision.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# Test images shown in Output/confident_mistakes.png.
MISTAKES_SHOWN = 16
# Datasets bigger than this share of the available memory are streamed from the cache.
MEMORY_SHARE = 0.25


class TrainingDiverged(Exception):
    """The loss became NaN and TerminateOnNaN stopped the run."""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train the small VGG network on a folder of images, one sub-folder per class.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="JSON or YAML file whose keys are flags (epochs, batch_size, ...); "
                             "flags given on the command line win")
    parser.add_argument("--dataset", default="Dataset", help="folder with one sub-folder per class")
    parser.add_argument("--val-dir", default=None,
                        help="validation images, one sub-folder per class; none means the test "
                             "split doubles as validation data, as in the blog")
    parser.add_argument("--test-dir", default=None,
                        help="test images, one sub-folder per class; none means --test-size of "
                             "--dataset is held out")
    parser.add_argument("--output", default="Output",
                        help="folder for the model, labels and reports")
    parser.add_argument("--logs", default="logs", help="folder for TensorBoard runs")
    parser.add_argument("--run-name", default=None,
                        help="TensorBoard run name; none means vgg-<date>-<time>")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--lr", type=float, default=0.0007, help="Adam learning rate")
    parser.add_argument("--image-size", type=int, default=64, help="images are resized to NxN")
    parser.add_argument("--test-size", type=float, default=0.15,
                        help="fraction held out for testing")
    parser.add_argument("--seed", type=int, default=42, help="seed for shuffle, split and weights")
    parser.add_argument("--bn-momentum", type=float, default=0.9,
                        help="BatchNormalization momentum (the blog's Keras default was 0.99)")
    parser.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="refuse images whose header claims more pixels than this")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads for decoding images")

    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--cache-dir", default=None,
                       help="where decoded images are kept between runs; none means "
                            "<output>/cache")
    speed.add_argument("--no-cache", action="store_true",
                       help="decode every image again instead of using the cache")
    speed.add_argument("--data-mode", choices=("auto", "memory", "stream"), default="auto",
                       help="hold the images in memory, or stream batches from the cache; "
                            f"auto streams datasets over {MEMORY_SHARE * 100:.0f}%% of the free memory")
    speed.add_argument("--precision", choices=("auto", *POLICIES), default="auto",
                       help="float32, or mixed precision with bfloat16/float16 compute; auto "
                            "picks bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX) and GPUs "
                            "of compute capability 8+, float16 on 7.x GPUs, float32 otherwise")

    augment = parser.add_argument_group("augmentation (training split only)")
    augment.add_argument("--augment", choices=("generator", "layers"), default="generator",
                         help="generator: ImageDataGenerator transforms; layers: the same "
                              "transforms as Keras preprocessing layers inside tf.data")
    augment.add_argument("--rotation-range", type=float, default=45, help="degrees")
    augment.add_argument("--width-shift-range", type=float, default=0.1, help="fraction of width")
    augment.add_argument("--height-shift-range", type=float, default=0.1,
                         help="fraction of height")
    augment.add_argument("--shear-range", type=float, default=0.2, help="shear angle, degrees")
    augment.add_argument("--zoom-range", type=float, default=0.2, help="zoom in or out by up to")
    augment.add_argument("--horizontal-flip", action=argparse.BooleanOptionalAction, default=True,
                         help="mirror images at random")

    labelling = parser.add_argument_group("multi-label training")
    labelling.add_argument("--multi-label", action="store_true",
                           help="images may carry several labels: each class folder name is "
                                "split on --label-separator (black_dress: black and dress); "
                                "one sigmoid output per label, binary cross-entropy")
    labelling.add_argument("--label-separator", default="_",
                           help="splits folder names into labels with --multi-label")
    labelling.add_argument("--labels-csv", default=None,
                           help="take the labels of --dataset from this CSV file of path,labels "
                                "rows (paths relative to --dataset; labels separated by "
                                "--csv-label-separator) instead of folder names; implies "
                                "--multi-label")
    labelling.add_argument("--csv-label-separator", default=";",
                           help="splits the labels column of --labels-csv")
    labelling.add_argument("--threshold", type=float, default=0.5,
                           help="with --multi-label, the test report counts a label as "
                                "predicted when its probability reaches this")

    callbacks = parser.add_argument_group("callbacks")
    callbacks.add_argument("--lr-factor", type=float, default=0.5,
                           help="ReduceLROnPlateau: multiply the learning rate by this")
    callbacks.add_argument("--lr-patience", type=int, default=5,
                           help="ReduceLROnPlateau: epochs without val_loss improvement")
    callbacks.add_argument("--min-lr", type=float, default=1e-6, help="ReduceLROnPlateau floor")
    callbacks.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                           help="stop after PATIENCE epochs without a better val_loss and keep "
                                "the best epoch's weights (0: off, as in the blog)")
    callbacks.add_argument("--class-weight", choices=("none", "balanced"), default="none",
                           help="balanced: weigh each class's loss by its rarity in training")
    callbacks.add_argument("--checkpoint-every", type=int, default=1,
                           help="write a checkpoint every N epochs")
    callbacks.add_argument("--checkpoint-best-only", action=argparse.BooleanOptionalAction,
                           default=True, help="only write a checkpoint when val_loss improves")
    callbacks.add_argument("--keep-checkpoints", type=int, default=5,
                           help="keep the newest N checkpoint files (0: keep all)")

    scale = parser.add_argument_group("several GPUs and machines (--batch-size is the global "
                                      "batch, over all of them)")
    scale.add_argument("--strategy", choices=distributed.STRATEGIES, default="auto",
                       help="single: one device; mirrored: the GPUs of this machine; "
                            "multi-worker: several machines; auto: multi-worker with TF_CONFIG "
                            "or --worker-addresses, mirrored with --devices or 2+ GPUs")
    scale.add_argument("--devices", default=None,
                       help="devices to mirror over, e.g. GPU:0,GPU:1; none means every GPU")
    scale.add_argument("--worker-addresses", default=None, metavar="HOST:PORT,...",
                       help="every worker's address, the chief first; instead of TF_CONFIG")
    scale.add_argument("--worker-index", type=int, default=None,
                       help="this worker's place in --worker-addresses (0: the chief)")
    parser.add_argument("--fresh", action="store_true",
                        help="start afresh instead of resuming an interrupted run")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        # The file's settings go first, so the command line's own flags override them.
        argv = config_flags(read_config_file(config_path), parser) + argv
    args = parser.parse_args(argv)
    if not 0 < args.test_size < 1:
        raise images.UserError(f"--test-size must be between 0 and 1, got {args.test_size}")
    if args.image_size < 16:
        raise images.UserError("--image-size must be at least 16 (the network halves it 4 times)")
    if args.run_name is None:
        args.run_name = time.strftime("vgg-%Y%m%d-%H%M%S")
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output, "cache")
    if args.no_cache and args.data_mode == "stream":
        raise images.UserError("--data-mode stream reads batches from the cache: drop --no-cache")
    if args.labels_csv:
        args.multi_label = True
    if args.multi_label and args.class_weight != "none":
        raise images.UserError("--class-weight weighs one class per image: it cannot be used "
                               "with --multi-label")
    if not 0 < args.threshold < 1:
        raise images.UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
    return args


def read_config_file(path):
    try:
        with open(path, encoding="utf-8") as handle:
            if path.lower().endswith((".yaml", ".yml")):
                settings = yaml.safe_load(handle)
            else:
                settings = json.load(handle)
    except OSError as error:
        raise images.UserError(f"cannot read the config file {path}: {error.strerror}") from None
    except (ValueError, yaml.YAMLError) as error:
        raise images.UserError(f"{path} is not valid JSON or YAML: {error}") from None
    if not isinstance(settings, dict):
        raise images.UserError(f"{path} must hold a mapping of flag names to values")
    return settings


def config_flags(settings, parser):
    """Command-line flags that say what the config file says, so that argparse checks the
    values (types, choices) exactly as it checks flags."""
    defaults = vars(parser.parse_args([]))
    flags = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in defaults or name == "config":
            raise images.UserError(f"unknown setting in the config file: {key} (the keys are "
                                   f"the flags without dashes: {', '.join(sorted(defaults))})")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif defaults[name]:
                flags.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


class PeriodicCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that only considers every `every`-th epoch and keeps the newest `keep`
    files (0: all). Keras 3 removed `period`, and its integer save_freq counts batches, when
    val_loss (part of the file name) is not known yet.

    Keras writes each checkpoint into a hidden .partial/ folder first; only a complete file
    is moved into the checkpoint folder, so a crash mid-write leaves no truncated model there.
    """

    def __init__(self, folder, every, keep, **kwargs):
        self.folder = folder
        self.partial = os.path.join(folder, ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        super().__init__(os.path.join(self.partial, CHECKPOINT_PATTERN), **kwargs)
        self.every, self.keep = every, keep

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or not finite_losses(logs or {}):
            return  # a NaN model never replaces the last good checkpoint
        super().on_epoch_end(epoch, logs)
        for name in os.listdir(self.partial) if os.path.isdir(self.partial) else []:
            os.replace(os.path.join(self.partial, name), os.path.join(self.folder, name))
        if self.keep:
            pattern = os.path.join(self.folder, "VGG_epoch-*.keras")
            for old in sorted(glob.glob(pattern), key=os.path.getmtime)[:-self.keep]:
                os.remove(old)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        shutil.rmtree(self.partial, ignore_errors=True)


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose patience bookkeeping survives a restart: BackupAndRestore
    brings back the weights and the optimizer (learning rate included), this brings back
    how long val_loss has stalled, so a resumed run lowers the rate when the original would."""

    def __init__(self, state_path, **kwargs):
        super().__init__(**kwargs)
        self.state_path = state_path
        self.restored = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self.restored and os.path.exists(self.state_path):
            with open(self.state_path) as handle:
                state = json.load(handle)
            if state.pop("next_epoch") == epoch:
                vars(self).update(state)
        self.restored = True

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        artifacts.write_json(self.state_path, {
            "next_epoch": epoch + 1, "best": float(self.best), "wait": self.wait,
            "cooldown_counter": self.cooldown_counter})


class TerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """Keras's TerminateOnNaN watches the training loss of each batch. With a far too high
    learning rate that loss can stay finite (huge) while the weights are already broken, so
    this one also stops when the validation loss of an epoch is NaN or infinite."""

    def on_epoch_end(self, epoch, logs=None):
        if not np.isfinite((logs or {}).get("val_loss", 0.0)):
            self.model.stop_training = True


def finite_losses(logs):
    return all(np.isfinite(logs.get(key, 0.0)) for key in ("loss", "val_loss"))


_transform_lock = threading.Lock()


def batches(x, y, batch_size, shard=(0, 1)):
    """Evaluation batches of uint8 images x as float32, in order, without augmentation; with
    shard (index, shards), only that shard's part of each batch (distributed.shard_part)."""
    def make_batch(start):
        chosen = np.arange(start, min(start + batch_size, len(x)))
        chosen = chosen[distributed.shard_part(len(chosen), shard)]
        return x[chosen].astype(np.float32), y[chosen]

    return _pipeline(tf.data.Dataset.range(0, len(x), batch_size), make_batch, x, y)


def training_batches(x, y, batch_size, augmentation, seed, first_epoch=0, shard=(0, 1)):
    """Augmented batches, epoch after epoch from first_epoch, without end: fit them with
    steps_per_epoch = ceil(len(x) / batch_size), so that every epoch sees every image once.
    With shard (index, shards), only that shard's part of each batch (distributed.shard_part).

    x is a uint8 array in memory or image_cache.ImageRows on disk: either way each batch is
    gathered from a fresh permutation of all the images (a full shuffle, 8 bytes per image),
    and only the batches in flight are held as float32.

    augmentation is an ImageDataGenerator, whose transforms run in parallel tf.data map
    calls, a Keras layer applied to whole batches inside tf.data, or None. The order, and the
    ImageDataGenerator transforms, of epoch e depend only on (seed, e): a run resumed at
    epoch e sees the batches the uninterrupted run would have seen, not a replay of the
    first epochs, and a shard's images get the transforms they get in the whole batch.
    Keras's PyDataset route was measured about half as fast here: it copies each batch
    through a Python generator.
    """
    steps = math.ceil(len(x) / batch_size)
    generator = augmentation if isinstance(augmentation, ImageDataGenerator) else None

    @functools.lru_cache(maxsize=4)
    def order(epoch):
        return np.random.default_rng([seed, epoch]).permutation(len(x))

    def make_batch(position):
        epoch, step = divmod(int(position), steps)
        chosen = order(epoch)[step * batch_size:(step + 1) * batch_size]
        part = distributed.shard_part(len(chosen), shard)
        images = x[chosen[part]].astype(np.float32)
        if generator and len(images):  # a shard's part of a short last batch may be empty
            # One seed per image of the whole batch, drawn in order, whichever part is ours.
            rng = np.random.default_rng([seed, epoch, step])
            seeds = [int(rng.integers(2**31)) for _ in chosen][part]
            images = np.stack([random_transform(generator, image, image_seed)
                               for image, image_seed in zip(images, seeds)])
        return images, y[chosen[part]]

    dataset = _pipeline(tf.data.Dataset.counter(start=first_epoch * steps), make_batch, x, y)
    if generator or augmentation is None:
        return dataset
    return dataset.map(lambda images, targets: (augmentation(images, training=True), targets),
                       num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _pipeline(positions, make_batch, x, y):
    """Only positions travel through tf.data; make_batch gathers each batch from x (uint8
    until then) in parallel map calls, so the next batches are ready while one trains."""
    def tf_make_batch(position):
        images, targets = tf.numpy_function(make_batch, [position], [tf.float32, tf.float32])
        images.set_shape((None, *x.shape[1:]))
        targets.set_shape((None, *y.shape[1:]))
        return images, targets

    return positions.map(tf_make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)


def augmentation_layers(args, seed):
    """ImageDataGenerator's transforms with the same parameters, as Keras layers (None when
    every transform is switched off)."""
    def options(offset):
        # float32 even under mixed precision: these run in tf.data, before the model casts.
        return {"fill_mode": "nearest", "seed": seed + offset, "dtype": "float32"}

    chosen = []
    if args.rotation_range:
        # RandomRotation's factor is a fraction of a full turn.
        chosen.append(keras.layers.RandomRotation(args.rotation_range / 360, **options(1)))
    if args.width_shift_range or args.height_shift_range:
        chosen.append(keras.layers.RandomTranslation(
            args.height_shift_range, args.width_shift_range, **options(2)))
    if args.shear_range:
        # ImageDataGenerator's shear_range is an angle in degrees; RandomShear wants the
        # horizontal displacement per unit of height, tan(angle), sampled in [-f, f].
        chosen.append(keras.layers.RandomShear(
            x_factor=math.tan(math.radians(args.shear_range)), **options(3)))
    if args.zoom_range:
        # Like ImageDataGenerator, each axis is zoomed in or out by up to zoom_range on its own.
        zoom = (-args.zoom_range, args.zoom_range)
        chosen.append(keras.layers.RandomZoom(zoom, zoom, **options(4)))
    if args.horizontal_flip:
        chosen.append(keras.layers.RandomFlip("horizontal", seed=seed + 5, dtype="float32"))
    return keras.Sequential(chosen, name="augmentation") if chosen else None


def random_transform(generator, image, seed):
    """ImageDataGenerator.random_transform, reproducible from seed even in parallel threads."""
    with _transform_lock:  # get_random_transform seeds NumPy's global generator
        params = generator.get_random_transform(image.shape, seed=seed)
    return generator.apply_transform(image, params)


def prepare_folders(args):
    """Create the output folders up front, so a bad location fails now, not after training."""
    for folder in (args.output, os.path.join(args.output, "checkpoints"), args.logs):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise images.UserError(f"cannot create {folder}: {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise images.UserError(f"cannot write to {folder}")


def load_dataset(args):
    """The images (uint8, N x size x size x 3) and class names of --dataset, and of --val-dir
    and --test-dir when given, each shuffled with the seed: {"train": (images, labels), ...}.

    The images come as arrays, or with the cache as image_cache.ImageRows (still on disk).
    """
    folders = {"train": args.dataset, "validation": args.val_dir, "test": args.test_dir}
    loaded, skipped, found = {}, [], 0
    for role, root in folders.items():
        if root:
            labels_csv = args.labels_csv if role == "train" else None
            data, labels, unusable, listed = load_folder(root, args, labels_csv)
            loaded[role] = data, labels
            skipped += unusable
            found += listed
    with artifacts.atomic_path(os.path.join(args.output, "skipped_files.csv")) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)
    if skipped:
        log.warning("skipped %d of %d files that could not be read as images (listed in %s)",
                    len(skipped), found, os.path.join(args.output, "skipped_files.csv"))
    classes = label_names(loaded["train"][1], args.multi_label)
    if len(classes) < 2:
        if args.multi_label:
            raise images.UserError(f"need at least 2 labels in {args.labels_csv or args.dataset}"
                                   f", found {len(classes)}")
        raise images.UserError(
            f"need images in at least 2 class folders of {args.dataset}, found {len(classes)}")
    for role in ("validation", "test"):
        unknown = (label_names(loaded[role][1], args.multi_label) - classes
                   if role in loaded else set())
        if unknown:
            raise images.UserError(
                f"{folders[role]} has classes that {args.dataset} has not: "
                f"{', '.join(sorted(unknown))}")
    return loaded


def label_names(labels, multi_label):
    """Every class (label) name that labels use."""
    return {name for names in labels for name in names} if multi_label else set(labels)


def load_folder(root, args, labels_csv=None):
    """(images, labels, skipped files, files found) for one folder of class sub-folders, or
    for the images that labels_csv lists. Labels are class names, or with --multi-label
    tuples of label names."""
    missing = []
    if labels_csv:
        listed = read_labels_csv(labels_csv, root, args.csv_label_separator)
        missing = [(path, f"listed in {labels_csv} but not found")
                   for path in listed if not os.path.isfile(path)]
        image_paths = sorted(path for path in listed if os.path.isfile(path))
    else:
        image_paths = images.list_images(root)
        image_paths = [path for path in image_paths if images.label_of(path, root)]
        folders = {entry.name for entry in os.scandir(root)
                   if entry.is_dir() and not entry.name.startswith(".")}
        for empty in sorted(folders - {images.label_of(path, root) for path in image_paths}):
            log.warning("class folder %s holds no images: ignored", os.path.join(root, empty))
    if not image_paths:
        where = labels_csv or f"class sub-folders of {root}"
        raise images.UserError(f"no images found in {where}")
    random.Random(args.seed).shuffle(image_paths)
    log.info("found %d images in %s", len(image_paths), root)

    if args.no_cache:
        data, kept, skipped = images.load_images(image_paths, args.image_size, args.max_pixels,
                                                 workers=args.workers)
    else:
        data, kept, skipped = image_cache.load_images(
            image_paths, args.image_size, args.cache_dir, args.max_pixels,
            workers=args.workers, name=image_cache.folder_name(root))
    if labels_csv:
        labels = [listed[image_paths[i]] for i in kept]
    elif args.multi_label:
        labels = [split_label(images.label_of(image_paths[i], root), args.label_separator)
                  for i in kept]
    else:
        labels = np.array([images.label_of(image_paths[i], root) for i in kept])
    return data, labels, missing + skipped, len(image_paths) + len(missing)


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
                    raise images.UserError(f"{path}, line {reader.line_num}: expected 2 columns "
                                           f"(path,labels), found {len(row)}")
                image_path = os.path.normpath(os.path.join(root, row[0].strip()))
                rows[image_path] = split_label(row[1], separator)
    except OSError as error:
        raise images.UserError(f"cannot read the labels file {path}: {error.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise images.UserError(f"{path} is not a CSV file of path,labels rows: {error}") from None
    return rows


def split(data, labels, targets, args, in_memory):
    """Stratified split; falls back to a plain random split when some class is too small.
    Returns train_x, test_x, train_y, test_y, the images in memory or still on disk."""
    positions = np.arange(len(labels))
    # With several labels per image, each combination of labels is a stratum.
    strata = [str(label) for label in labels]
    try:
        train_at, test_at = train_test_split(positions, test_size=args.test_size,
                                             random_state=args.seed, stratify=strata)
    except ValueError as error:
        log.warning("cannot stratify the split (%s); splitting at random", error)
        train_at, test_at = train_test_split(positions, test_size=args.test_size,
                                             random_state=args.seed)
    return take(data, train_at, in_memory), take(data, test_at, in_memory), \
        targets[train_at], targets[test_at]


def own_split(loaded, binarizer, in_memory):
    """A folder given as its own split: its images and one-hot labels."""
    data, labels = loaded
    return take(data, slice(None), in_memory), artifacts.one_hot(binarizer, labels)


def take(data, positions, in_memory):
    """The images at positions (an index array, or slice(None) for all: no copy in memory)."""
    if isinstance(data, np.ndarray):
        return data[positions]
    part = data.subset(positions)
    return part.load() if in_memory else part


def choose_data_mode(requested, dataset_bytes, free_bytes):
    if requested != "auto":
        return requested
    return "stream" if dataset_bytes > MEMORY_SHARE * free_bytes else "memory"


def available_memory():
    """Bytes the system can still give without swapping (MemAvailable where Linux has it)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_precision(requested, gpu_capabilities, cpu_flags):
    """The Keras dtype policy for --precision: bfloat16 only where the hardware computes
    it natively (emulated, it is slower than float32), float16 on GPUs that have fast
    float16 but no bfloat16, float32 everywhere else."""
    if requested != "auto":
        return POLICIES[requested]
    if gpu_capabilities:
        oldest = min(gpu_capabilities)
        if oldest >= (8, 0):
            return POLICIES["bfloat16"]
        return POLICIES["float16"] if oldest >= (7, 0) else POLICIES["float32"]
    if {"avx512_bf16", "amx_bf16"} & set(cpu_flags):
        return POLICIES["bfloat16"]
    return POLICIES["float32"]


def gpu_capabilities():
    """Compute capability (major, minor) of each visible GPU."""
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        found.append(tuple(capability) if capability else (0, 0))
    return found


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def build_callbacks(args, resuming):
    checkpoint_dir = os.path.join(args.output, "checkpoints")
    backup_dir = os.path.join(args.output, BACKUP_DIR)
    return [
        # First, so that the learning rate it sets is the one the loggers and the backup see.
        ResumableReduceLROnPlateau(os.path.join(backup_dir, "plateau.json"),
                                   monitor="val_loss", factor=args.lr_factor,
                                   patience=args.lr_patience, min_lr=args.min_lr, verbose=1),
        TerminateOnNaN(),
        *([keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.early_stopping,
                                         restore_best_weights=True, verbose=1)]
          if args.early_stopping else []),
        PeriodicCheckpoint(checkpoint_dir, every=args.checkpoint_every,
                           keep=args.keep_checkpoints, monitor="val_loss",
                           save_best_only=args.checkpoint_best_only),
        keras.callbacks.TensorBoard(log_dir=os.path.join(args.logs, args.run_name)),
        keras.callbacks.CSVLogger(os.path.join(args.output, HISTORY_FILE), append=resuming),
        # Last: the backup of an epoch is complete only once everything above has run.
        keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True),
    ]


def save_overview(classes, train_x, train_y, val_y, test_y, output):
    """Images per class (per label when multi-label) in each split, and a few training
    images of each class."""
    counts = {"training": train_y.sum(axis=0), "test": test_y.sum(axis=0)}
    if val_y is not None:
        counts["validation"] = val_y.sum(axis=0)
    samples = {index: train_x[np.flatnonzero(train_y[:, index])[:reports.SAMPLES_PER_CLASS]]
               for index in range(len(classes))}
    reports.save_dataset_overview(counts, samples, classes, output)


def resume_point(args):
    """The interrupted run to resume, as (run name, first epoch), or None to start afresh.

    The backup folder remembers the settings it was made with; resuming with other settings
    would silently mix two experiments, so that is refused.
    """
    backup_dir = os.path.join(args.output, BACKUP_DIR)
    run_file = os.path.join(backup_dir, "run.json")
    settings = resume_settings(args)
    if args.fresh:
        shutil.rmtree(backup_dir, ignore_errors=True)
    if not os.path.exists(run_file):
        os.makedirs(backup_dir, exist_ok=True)
        artifacts.write_json(run_file, {"settings": settings, "run_name": args.run_name})
        return None
    with open(run_file) as handle:
        run = json.load(handle)
    if run["settings"] != settings:
        changed = sorted(key for key, value in settings.items()
                         if run["settings"].get(key) != value)
        raise images.UserError(
            f"{backup_dir} holds an interrupted run with other settings ({', '.join(changed)}): "
            "run it again with the same flags to resume, or add --fresh to start over")
    epoch = 0
    metadata = os.path.join(backup_dir, "training_metadata.json")
    if os.path.exists(metadata):
        with open(metadata) as handle:
            epoch = json.load(handle)["epoch"]
    return run["run_name"], epoch


def resume_settings(args):
    return {key: value for key, value in vars(args).items() if key not in NOT_RESUME_RELEVANT}


def check_free_space(model, args):
    """Fail before training, not after it, when the output disk cannot hold the files."""
    per_model = model.count_params() * 4 * 3  # weights plus Adam's two moments, float32
    copies = min(args.keep_checkpoints or args.epochs, args.epochs) + 3  # + final, 2 backups
    free = shutil.disk_usage(args.output).free
    if free < per_model * copies:
        raise images.UserError(
            f"only {free / 1e6:.0f} MB free for {args.output}, about "
            f"{per_model * copies / 1e6:.0f} MB needed (fewer with --keep-checkpoints)")


def read_history(output):
    """Per-epoch metrics from history.csv: every epoch, also those before a resume."""
    rows = {}
    path = os.path.join(output, HISTORY_FILE)
    if not os.path.exists(path):  # stopped before the first epoch ended
        return {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if None in row.values() or "" in row.values():
                continue  # a line cut short by a crash while it was being written
            rows[int(row["epoch"])] = row  # a repeated epoch (resumed mid-way): keep the last
    keys = next(iter(rows.values())).keys() if rows else []
    return {key: [float(rows[epoch][key]) for epoch in sorted(rows)] for key in keys}


def train(args, extra_callbacks=()):
    """Run the whole pipeline; return a summary dict (paths and test accuracy).

    extra_callbacks are added to fit's (before the backup), for programs that drive train(),
    like benchmarks/bench.py."""
    strategy = distributed.choose_strategy(args.strategy, args.devices, args.worker_addresses,
                                           args.worker_index)
    if not distributed.is_chief(strategy):
        args.output = distributed.private_folder(strategy)
        args.logs = os.path.join(args.output, "logs")
    prepare_folders(args)
    keras.utils.set_random_seed(args.seed)

    loaded = load_dataset(args)
    data, labels = loaded.pop("train")
    binarizer, targets = artifacts.fit_binarizer(labels, args.multi_label)
    classes = [str(name) for name in binarizer.classes_]
    total_bytes = data.size + sum(part.size for part, _ in loaded.values())
    data_mode = choose_data_mode(args.data_mode, total_bytes, available_memory())
    in_memory = data_mode == "memory"
    if "test" in loaded:
        train_x, train_y = take(data, slice(None), in_memory), targets
        test_x, test_y = own_split(loaded["test"], binarizer, in_memory)
    else:
        train_x, test_x, train_y, test_y = split(data, labels, targets, args, in_memory)
    val_x, val_y = own_split(loaded["validation"], binarizer, in_memory) \
        if "validation" in loaded else (test_x, test_y)
    del data, loaded
    precision = choose_precision(args.precision, gpu_capabilities(), cpu_flags())
    log.info("images %s, %s precision", "in memory" if data_mode == "memory"
             else f"streamed from {args.cache_dir}", precision)
    log.info("%d %s: %s", len(classes), "labels" if args.multi_label else "classes", ", ".join(
        f"{name} ({count:.0f})" for name, count in zip(classes, targets.sum(axis=0))))
    log.info("training on %d images, validating on %d%s, testing on %d", len(train_x),
             len(val_x), "" if args.val_dir else " (the test split)", len(test_x))

    if args.augment == "layers":
        augmentation = augmentation_layers(args, args.seed)
    else:
        augmentation = ImageDataGenerator(
            rotation_range=args.rotation_range, width_shift_range=args.width_shift_range,
            height_shift_range=args.height_shift_range, shear_range=args.shear_range,
            zoom_range=args.zoom_range, horizontal_flip=args.horizontal_flip,
            fill_mode="nearest")

    # Layers take the global policy when they are built; put it back for whatever runs next.
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    with distributed.model_scope(strategy):
        try:
            model = vgg.build_vgg((args.image_size, args.image_size, 3), len(classes),
                                  bn_momentum=args.bn_momentum, multi_label=args.multi_label,
                                  synchronized_bn=strategy.num_replicas_in_sync > 1)
        finally:
            keras.mixed_precision.set_dtype_policy(previous_policy)
        if args.multi_label:
            # Keras would also call this "accuracy"; it is the share of right yes/no label
            # decisions, not of images with every label right (that one is in the test report).
            loss, metrics = "binary_crossentropy", [keras.metrics.BinaryAccuracy(
                name="binary_accuracy", threshold=args.threshold)]
        else:
            loss, metrics = "categorical_crossentropy", ["accuracy"]
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr), loss=loss,
                      metrics=metrics)
    check_free_space(model, args)
    resume = resume_point(args)
    first_epoch = 0
    if resume:
        args.run_name, first_epoch = resume
        log.info("resuming the interrupted run %s after epoch %d (--fresh starts over)",
                 args.run_name, first_epoch)
    steps = math.ceil(len(train_x) / args.batch_size)
    test_batches = batches(test_x, test_y, args.batch_size)
    validation_batches = batches(val_x, val_y, args.batch_size) if args.val_dir else test_batches
    class_weight = None
    if args.class_weight == "balanced":
        present = train_y.argmax(axis=1)
        weights = compute_class_weight("balanced", classes=np.unique(present), y=present)
        class_weight = {int(index): float(weight)
                        for index, weight in zip(np.unique(present), weights)}
        log.info("class weights: %s", ", ".join(
            f"{classes[index]} {weight:.2f}" for index, weight in class_weight.items()))
    artifacts.save_labels(binarizer, args.output, args.image_size)
    save_overview(classes, train_x, train_y, val_y if args.val_dir else None, test_y,
                  args.output)
    write_config(args, classes, len(train_x), len(test_x), data_mode=data_mode,
                 precision=precision, validation_images=len(val_x), class_weights=class_weight)

    callbacks = build_callbacks(args, resuming=bool(resume))
    callbacks[-1:-1] = extra_callbacks
    started = time.perf_counter()
    interrupted = False
    try:
        if distributed.is_multi_worker(strategy):
            distributed.fit(
                strategy, model, functools.partial(
                    training_batches, train_x, train_y, args.batch_size, augmentation, args.seed),
                steps, functools.partial(batches, val_x, val_y, args.batch_size),
                epochs=args.epochs, first_epoch=first_epoch, class_weight=class_weight,
                callbacks=callbacks, verbose=2)
        else:
            # shuffle=False: the pipeline reshuffles itself each epoch.
            model.fit(training_batches(train_x, train_y, args.batch_size, augmentation,
                                       args.seed, first_epoch), steps_per_epoch=steps,
                      validation_data=validation_batches, epochs=args.epochs, shuffle=False,
                      class_weight=class_weight, callbacks=callbacks, verbose=2)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: saving the model and reports of the epochs done; run the "
                    "same command again to resume from the last completed epoch")
    seconds = time.perf_counter() - started
    history = read_history(args.output)
    epochs_run = len(history.get("loss", []))
    if epochs_run and not finite_losses({key: values[-1] for key, values in history.items()}):
        shutil.rmtree(os.path.join(args.output, BACKUP_DIR), ignore_errors=True)
        raise TrainingDiverged(
            f"the loss became NaN or infinite in epoch {epochs_run}, and TerminateOnNaN stopped "
            f"training: try a lower learning rate than --lr {args.lr}. The last good "
            f"checkpoint, if any, is in {os.path.join(args.output, 'checkpoints')}")
    log.info("trained %d epochs in %.1f s", epochs_run, seconds)

    model_path = os.path.join(args.output, artifacts.MODEL_FILE)
    with artifacts.atomic_path(model_path) as temporary:
        model.save(temporary)
    probabilities = model.predict(test_batches, verbose=0)
    if args.multi_label:  # label indicator rows: what scikit-learn takes as multi-label
        true = test_y.astype(int)
        predicted = (probabilities >= args.threshold).astype(int)
        accuracy = float(np.mean(np.all(true == predicted, axis=1)))  # exact match
    else:
        true, predicted = test_y.argmax(axis=1), probabilities.argmax(axis=1)
        accuracy = float(np.mean(true == predicted))
    report, scores = reports.save_classification_report(true, predicted, classes, args.output)
    reports.save_confusion_matrix(true, predicted, classes, args.output)
    wrong = reports.confident_mistakes(true, probabilities, MISTAKES_SHOWN, args.threshold)
    reports.save_confident_mistakes(test_x[wrong], true[wrong], probabilities[wrong], classes,
                                    args.output, args.threshold)
    if epochs_run:
        reports.save_training_plot(history, args.output)
    reports.write_html(args.output, {
        ("test exact-match accuracy" if args.multi_label else "test accuracy"):
            f"{accuracy:.4f}",
        "labels": (f"several per image (threshold {args.threshold})" if args.multi_label
                   else "one per image"),
        "epochs": f"{epochs_run} of {args.epochs}",
        "classes": len(classes), "training images": len(train_x),
        "validation images": len(val_x) if args.val_dir else "the test split",
        "test images": len(test_x), "image size": f"{args.image_size}x{args.image_size}",
        "precision": precision, "training time": f"{seconds:.0f} s",
        "TensorBoard run": os.path.join(args.logs, args.run_name)}, scores)
    print(report)
    print(f"report: {os.path.join(args.output, reports.HTML)}")
    return {"model": model_path, "test_accuracy": accuracy, "multi_label": args.multi_label,
            "epochs": epochs_run, "seconds": seconds, "classes": classes,
            "output": args.output, "logs": os.path.join(args.logs, args.run_name),
            "interrupted": interrupted}


def write_config(args, classes, train_count, test_count, **resolved):
    """The resolved configuration, so that a run can be told apart and repeated."""
    config = dict(vars(args), classes=classes, train_images=train_count,
                  test_images=test_count, keras_version=keras.__version__, **resolved)
    artifacts.write_json(os.path.join(args.output, "config.json"), config)


def setup_logging(verbose=False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # TensorFlow's Python INFO messages (tf.distribute's, mostly), like its C++ ones: with -v.
    logging.getLogger("tensorflow").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    setup_logging(verbose="-v" in argv or "--verbose" in argv)
    try:
        summary = train(parse_args(argv))
    except images.UserError as error:
        log.error("%s", error)
        return 2
    except TrainingDiverged as error:
        log.error("%s", error)
        return 3
    except distributed.WorkerLost as error:
        log.error("%s", error)
        return 4
    except OSError as error:  # a full disk or a folder that went away mid-run
        log.error("cannot write %s: %s", error.filename or "the output", error.strerror or error)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted before training started")
        return 130
    print(f"model: {summary['model']}")
    print(f"reports and plots: {summary['output']}")
    print(f"TensorBoard: tensorboard --logdir {os.path.dirname(summary['logs']) or '.'}")
    print(f"test {'exact-match ' if summary['multi_label'] else ''}accuracy: "
          f"{summary['test_accuracy']:.2f}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
