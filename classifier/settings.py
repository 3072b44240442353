"""train.py's settings: its flags, grouped by topic, a --config file of the same settings, the
checks of their values, and the resolved configuration written beside the model."""

import argparse
import json
import os
import time

import keras
import yaml

from classifier import artifacts, augmentation, distributed, hardware, images, inference, networks
from classifier.cli import Range, UserError, check_ranges

CONFIG_FILE = "config.json"
TUNE_VAL_SIZE = 0.15  # the validation part --tune splits off when none is given
# The settings --tune searches, and the flags that fix each when given.
SEARCHED = {"lr", "label_smoothing", "image_size", "model", "weights", "augment",
            "fine_tune_lr", *augmentation.BLOG}
# --recipe fast: the defaults it brings, chosen by measurement on a validation folder; its
# augmentation is augmentation.RECIPES["fast"].
RECIPES = {"fast": {"epochs": 25, "schedule": "onecycle", "optimizer": "adamw", "lr": 0.003,
                    "weight_decay": 0.004, "label_smoothing": 0.1, "warmup_epochs": 1.0,
                    **augmentation.RECIPES["fast"]}}
AT_LEAST_ONE, COUNT, FRACTION = Range(1), Range(0), Range(0, 1, low_open=True, high_open=True)
# Every numeric setting and the values it allows, flag or config key alike.
RANGES = {
    "test_size": FRACTION, "val_size": Range(0, 1, high_open=True), "threshold": FRACTION,
    "image_size": Range(16, 1024, why="the networks take 16 (vgg) or 32 at the least"),
    "max_pixels": AT_LEAST_ONE, "workers": AT_LEAST_ONE, "epochs": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE, "checkpoint_every": AT_LEAST_ONE,
    "lr": Range(0, low_open=True), "min_lr": COUNT,
    "lr_factor": FRACTION, "lr_patience": COUNT, "early_stopping": COUNT,
    "keep_checkpoints": COUNT, "worker_index": COUNT,
    "seed": Range(0, 2**32 - 1), "bn_momentum": Range(0, 1),
    "rotation_range": Range(0, 180), "shear_range": Range(0, 90, high_open=True),
    "width_shift_range": Range(0, 1, high_open=True),
    "height_shift_range": Range(0, 1, high_open=True),
    "zoom_range": Range(0, 1, high_open=True),
    "warmup_epochs": Range(0), "weight_decay": Range(0),
    "label_smoothing": Range(0, 1, high_open=True),
    "head_epochs": COUNT, "fine_tune_lr": Range(0, low_open=True),
    "label_issue_folds": Range(2, why="cross-validation needs two folds at least"),
    "label_issue_epochs": AT_LEAST_ONE,
    "tune": Range(0, low_open=True), "tune_trials": COUNT,
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train an image classifier, the blog's small VGG network by default, on a "
                    "folder of images, one sub-folder per class.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="JSON or YAML file whose keys are flags (epochs, batch_size, ...); "
                             "flags given on the command line win")
    for add_group in (_data_flags, _data_check_flags, _labelling_flags, _model_flags, _fine_tuning_flags,
                      _augmentation_flags, _schedule_flags, _search_flags, _checkpoint_flags,
                      _cluster_flags, _output_flags):
        add_group(parser)
    return parser


def _data_flags(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="Dataset", help="folder with one sub-folder per class")
    group.add_argument("--val-dir", default=None,
                       help="validation images, one sub-folder per class; none means --val-size "
                            "of --dataset, or with 0 the test split doubles as validation data, "
                            "as in the blog")
    group.add_argument("--test-dir", default=None,
                       help="test images, one sub-folder per class; none means --test-size of "
                            "--dataset is held out")
    group.add_argument("--test-size", type=float, default=0.15,
                       help="fraction held out for testing")
    group.add_argument("--val-size", type=float, default=0.0,
                       help="fraction of --dataset held out for validation, which also "
                            "calibrates the probabilities; 0: none")
    group.add_argument("--image-size", type=int, default=64, help="images are resized to NxN")
    group.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                       help="refuse images whose header claims more pixels than this")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="threads for decoding images")
    group.add_argument("--cache-dir", default=None,
                       help="where decoded images are kept between runs; none means "
                            "<output>/cache")
    group.add_argument("--no-cache", action="store_true",
                       help="decode every image again instead of using the cache")
    group.add_argument("--data-mode", choices=("auto", "memory", "stream"), default="auto",
                       help="hold the images in memory, or stream batches from the cache; auto "
                            f"streams datasets over {hardware.MEMORY_SHARE * 100:.0f}%% of the "
                            "free memory")
    group.add_argument("--class-weight", choices=("none", "balanced"), default="none",
                       help="balanced: weigh each class's loss by its rarity in training")


def _data_check_flags(parser):
    group = parser.add_argument_group(
        "data check (every run looks for copies, conflicting labels and odd images first)")
    group.add_argument("--check-only", action="store_true",
                       help="check the data and write its report into <output>/check/, "
                            "without training or touching an earlier run's files")
    group.add_argument("--find-label-issues", action="store_true",
                       help="also rank the training images whose label is probably wrong "
                            "(label_issues.csv), by cross-validation: trains "
                            "--label-issue-folds extra models first")
    group.add_argument("--label-issue-folds", type=int, default=4,
                       help="folds of that cross-validation")
    group.add_argument("--label-issue-epochs", type=int, default=10,
                       help="epochs each of its models trains")


def _labelling_flags(parser):
    group = parser.add_argument_group("multi-label training")
    group.add_argument("--multi-label", action="store_true",
                       help="images may carry several labels: each class folder name is split "
                            "on --label-separator (black_dress: black and dress); one sigmoid "
                            "output per label, binary cross-entropy")
    group.add_argument("--label-separator", default="_",
                       help="splits folder names into labels with --multi-label")
    group.add_argument("--labels-csv", default=None,
                       help="take the labels of --dataset from this CSV file of path,labels rows "
                            "(paths relative to --dataset; labels separated by "
                            "--csv-label-separator) instead of folder names; implies "
                            "--multi-label")
    group.add_argument("--csv-label-separator", default=";",
                       help="splits the labels column of --labels-csv")
    group.add_argument("--threshold", type=float, default=0.5,
                       help="with --multi-label, the test report counts a label as predicted "
                            "when its probability reaches this")


def _model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=networks.REGISTRY, default=networks.DEFAULT,
                       help="the network: vgg, the blog's small VGG; or from keras.applications "
                            + ", ".join(f"{network.name} (at least {network.min_size} px, made "
                                        f"for {network.recommended_size})"
                                        for network in networks.REGISTRY.values()
                                        if network.imagenet))
    group.add_argument("--weights", default=None, metavar="imagenet|none|PATH",
                       help="the network's starting weights: imagenet (Keras's download and "
                            "cache, KERAS_HOME or ~/.keras/models), none (random), or a "
                            "keras.applications weights file; none means imagenet for the "
                            "keras.applications networks, none for vgg")
    group.add_argument("--init-from", default=None, metavar="MODEL.keras",
                       help="start from a model trained here before: its network and weights, "
                            "with a new output layer when the classes differ")
    group.add_argument("--bn-momentum", type=float, default=0.9,
                       help="BatchNormalization momentum (the blog's Keras default was 0.99)")
    group.add_argument("--precision", choices=("auto", *hardware.POLICIES), default="auto",
                       help="float32, or mixed precision with bfloat16/float16 compute; auto "
                            "picks bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX) and "
                            "GPUs of compute capability 8+, float16 on 7.x GPUs, float32 "
                            "otherwise")


def _fine_tuning_flags(parser):
    group = parser.add_argument_group(
        "fine-tuning (with pretrained weights: --weights imagenet or PATH, --init-from)")
    group.add_argument("--head-epochs", type=int, default=5,
                       help="first train only the new output layer, the rest frozen, for this "
                            "many epochs at --lr; the remaining epochs train the whole network "
                            "(BatchNormalization kept in inference mode) at --fine-tune-lr")
    group.add_argument("--fine-tune-lr", type=float, default=None,
                       help="the learning rate (peak, with --schedule onecycle) of the "
                            "fine-tuning epochs; none means --lr / 10")


def _augmentation_flags(parser):
    group = parser.add_argument_group("augmentation (training split only)")
    group.add_argument("--augment", choices=("generator", "layers", "randaugment"),
                       default="generator",
                       help="generator: ImageDataGenerator transforms; layers: the same "
                            "transforms as Keras preprocessing layers inside tf.data; "
                            "randaugment: Keras's RandAugment layer, and --horizontal-flip")
    group.add_argument("--mix", choices=("none", "mixup", "cutmix"), default="none",
                       help="blend pairs of training images and their labels with Keras's "
                            "MixUp or CutMix layer, after the augmentation")
    blog = augmentation.BLOG
    group.add_argument("--rotation-range", type=float, default=blog["rotation_range"],
                       help="degrees")
    group.add_argument("--width-shift-range", type=float, default=blog["width_shift_range"],
                       help="fraction of width")
    group.add_argument("--height-shift-range", type=float, default=blog["height_shift_range"],
                       help="fraction of height")
    group.add_argument("--shear-range", type=float, default=blog["shear_range"],
                       help="shear angle, degrees")
    group.add_argument("--zoom-range", type=float, default=blog["zoom_range"],
                       help="zoom in or out by up to")
    group.add_argument("--horizontal-flip", action=argparse.BooleanOptionalAction, default=True,
                       help="mirror images at random")


def _schedule_flags(parser):
    group = parser.add_argument_group("training schedule")
    group.add_argument("--recipe", choices=("blog", *RECIPES), default="blog",
                       help="blog: the blog's settings, as the defaults shown here; fast: "
                            "the defaults become " + ", ".join(
                                f"--{name.replace('_', '-')} {value}"
                                for name, value in RECIPES["fast"].items())
                            + "; flags given explicitly win")
    group.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    group.add_argument("--batch-size", type=int, default=64, help="images per training step")
    group.add_argument("--lr", type=float, default=0.0007,
                       help="the learning rate; with --schedule onecycle its peak")
    group.add_argument("--schedule", choices=("plateau", "onecycle"), default="plateau",
                       help="plateau: ReduceLROnPlateau lowers --lr when val_loss stalls; "
                            "onecycle: a linear warm-up from --lr/25 to --lr over "
                            "--warmup-epochs, then cosine annealing to 0 at the last step")
    group.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="onecycle: the warm-up's length, in epochs")
    group.add_argument("--optimizer", choices=("adam", "adamw"), default="adam",
                       help="adam, or adamw: Adam with decoupled weight decay")
    group.add_argument("--weight-decay", type=float, default=0.004,
                       help="adamw: the weight decay (Keras's default)")
    group.add_argument("--label-smoothing", type=float, default=0.0,
                       help="train against targets of 1 - s for the class and s/classes "
                            "for each")
    group.add_argument("--lr-find", action="store_true",
                       help="instead of training, sweep the learning rate from 1e-7 upward "
                            "for a few hundred steps until the loss explodes; write "
                            "lr_find.png and print the suggested --lr; saves no model")
    group.add_argument("--seed", type=int, default=42,
                       help="seed for shuffle, split and weights")
    group.add_argument("--lr-factor", type=float, default=0.5,
                       help="ReduceLROnPlateau: multiply the learning rate by this")
    group.add_argument("--lr-patience", type=int, default=5,
                       help="ReduceLROnPlateau: epochs without val_loss improvement")
    group.add_argument("--min-lr", type=float, default=1e-6, help="ReduceLROnPlateau floor")
    group.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                       help="stop after PATIENCE epochs without a better val_loss and keep the "
                            "best epoch's weights (0: off, as in the blog)")


def _search_flags(parser):
    group = parser.add_argument_group(
        "search (--tune: the settings chosen on the validation part, then the final run)")
    group.add_argument("--tune", type=float, default=None, metavar="MINUTES",
                       help="first search, for this many minutes, the learning rate, "
                            "augmentation strength, label smoothing, image size and network "
                            "(with ImageNet weights where at hand) that score best on the "
                            "validation part (--val-dir, or --val-size, "
                            f"{TUNE_VAL_SIZE} when neither is given), each trial trained for "
                            "--epochs, poor ones stopped early; flags given explicitly stay "
                            "fixed; then train the final model with the chosen settings")
    group.add_argument("--tune-trials", type=int, default=0, metavar="N",
                       help="stop the search after N trials, within --tune's minutes (0: as "
                            "many as fit)")


def _checkpoint_flags(parser):
    group = parser.add_argument_group("checkpoints and resume")
    group.add_argument("--checkpoint-every", type=int, default=1,
                       help="write a checkpoint every N epochs")
    group.add_argument("--checkpoint-best-only", action=argparse.BooleanOptionalAction,
                       default=True, help="only write a checkpoint when val_loss improves")
    group.add_argument("--keep-checkpoints", type=int, default=5,
                       help="keep the newest N checkpoint files (0: keep all)")
    group.add_argument("--fresh", action="store_true",
                       help="start afresh instead of resuming an interrupted run")


def _cluster_flags(parser):
    group = parser.add_argument_group("several GPUs and machines (--batch-size is the global "
                                      "batch, over all of them)")
    group.add_argument("--strategy", choices=distributed.STRATEGIES, default="auto",
                       help="single: one device; mirrored: the GPUs of this machine; "
                            "multi-worker: several machines; auto: multi-worker with TF_CONFIG "
                            "or --worker-addresses, mirrored with --devices or 2+ GPUs")
    group.add_argument("--devices", default=None,
                       help="devices to mirror over, e.g. GPU:0,GPU:1; none means every GPU")
    group.add_argument("--worker-addresses", default=None, metavar="HOST:PORT,...",
                       help="every worker's address, the chief first; instead of TF_CONFIG")
    group.add_argument("--worker-index", type=int, default=None,
                       help="this worker's place in --worker-addresses (0: the chief)")


def _output_flags(parser):
    group = parser.add_argument_group("output")
    group.add_argument("--output", default=artifacts.OUTPUT,
                       help="folder for the model, labels and reports")
    group.add_argument("--logs", default="logs", help="folder for TensorBoard runs")
    group.add_argument("--run-name", default=None,
                       help="TensorBoard run name; none means <model>-<date>-<time> "
                            "(tune-<date>-<time> with --tune)")
    inference.add_tta_flag(group)  # for the test report
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def parse_args(argv):
    """The settings from the command line, over those of its --config file, over the
    defaults of its --recipe, checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = list(argv)
    if args.config:
        # The file's settings go first, so the command line's own flags override them.
        flags = config_flags(read_config_file(args.config), parser, args) + flags
        args = parser.parse_args(flags)
    if args.recipe != "blog":
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(flags)
    if args.init_from:
        args.model = network_to_init_from(args, explicit="--model" in flags or any(
            flag.startswith("--model=") for flag in flags))
    if args.tune:
        args.tune_fixed = sorted(explicit_settings(flags) & SEARCHED)
        if not args.val_dir and not args.val_size:
            args.val_size = TUNE_VAL_SIZE
    check(args)
    if args.weights is None:
        args.weights = "none" if args.init_from else networks.get(args.model).default_weights
    if args.fine_tune_lr is None:
        args.fine_tune_lr = args.lr / 10
    if args.run_name is None:
        # --tune: the network is not known yet.
        args.run_name = time.strftime(f"{'tune' if args.tune else args.model}-%Y%m%d-%H%M%S")
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output, "cache")
    if args.labels_csv:
        args.multi_label = True
    return args


def explicit_settings(flags):
    """The names of the settings that flags (the command line's, and its config file's) give
    explicitly, not by a default or a recipe."""
    parser = build_parser()
    # argparse has no public way to tell a default from a value given: suppress every default
    # (set_defaults cannot: it would type-convert the marker).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(flags)))


def network_to_init_from(args, explicit):
    """The network of the --init-from model (its labels.json says), checked against --model
    (when explicit) and --image-size."""
    if not os.path.isfile(args.init_from):
        raise UserError(f"--init-from {args.init_from}: no such file")
    info = artifacts.load_info(args.init_from) or {}
    network = info.get("network", networks.DEFAULT)
    if explicit and args.model != network:
        raise UserError(f"--init-from {args.init_from} is a {network} model: drop --model "
                        f"{args.model}")
    if info.get("image_size", args.image_size) != args.image_size:
        raise UserError(f"--init-from {args.init_from} was trained on {info['image_size']} px "
                        f"images: pass --image-size {info['image_size']}")
    return network


def check(args):
    """Refuse, before anything is loaded, settings that cannot work together or at all."""
    check_ranges(args, RANGES)
    networks.check_image_size(args.model, args.image_size)
    if args.val_size and args.val_dir:
        raise UserError("--val-dir is the validation part: drop --val-size")
    if args.val_size + (0 if args.test_dir else args.test_size) >= 1:
        raise UserError(f"--val-size {args.val_size} and --test-size {args.test_size} leave no "
                        "training images")
    if args.init_from and args.weights is not None:
        raise UserError("--init-from brings its own weights: drop --weights")
    if args.no_cache and args.data_mode == "stream":
        raise UserError("--data-mode stream reads batches from the cache: drop --no-cache")
    if args.warmup_epochs >= args.epochs and args.schedule == "onecycle":
        raise UserError(f"--warmup-epochs ({args.warmup_epochs}) must be fewer than --epochs "
                        f"({args.epochs})")
    if args.find_label_issues and (args.worker_addresses or os.environ.get("TF_CONFIG")):
        raise UserError("--find-label-issues runs on one machine: drop the multi-worker "
                        "settings")
    if args.tune:
        for flag, given in (("--lr-find", args.lr_find), ("--check-only", args.check_only),
                            ("--init-from", args.init_from)):
            if given:
                raise UserError(f"--tune trains models of its own: drop {flag}")
        if args.worker_addresses or os.environ.get("TF_CONFIG"):
            raise UserError("--tune runs on one machine: drop the multi-worker settings")
    elif args.tune_trials:
        raise UserError("--tune-trials counts the trials of --tune: add --tune MINUTES")
    if args.check_only and args.lr_find:
        raise UserError("--check-only trains nothing: drop --lr-find")
    if args.lr_find and (args.worker_addresses or os.environ.get("TF_CONFIG")):
        raise UserError("--lr-find runs on one machine: drop the multi-worker settings")
    if (args.multi_label or args.labels_csv) and args.class_weight != "none":
        raise UserError("--class-weight weighs one class per image: it cannot be used with "
                        "--multi-label")


def read_config_file(path):
    try:
        with open(path, encoding="utf-8") as handle:
            if path.lower().endswith((".yaml", ".yml")):
                settings = yaml.safe_load(handle)
            else:
                settings = json.load(handle)
    except OSError as error:
        raise UserError(f"cannot read the config file {path}: {error.strerror}") from None
    except (ValueError, yaml.YAMLError) as error:
        raise UserError(f"{path} is not valid JSON or YAML: {error}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} must hold a mapping of flag names to values")
    return settings


def config_flags(settings, parser, parsed):
    """Command-line flags that say what the config file says, so that argparse checks the
    values (types, choices) exactly as it checks flags. parsed names every setting."""
    known = vars(parsed)
    flags = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config":
            raise UserError(f"unknown setting in the config file: {key} (the keys are the "
                            f"flags without dashes: {', '.join(sorted(known))})")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif parser.get_default(name):
                flags.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def write_config(args, folder, **resolved):
    """folder/config.json: the resolved configuration, so that a run can be told apart and
    repeated: the settings, with what the run resolved (folders, run name, classes, split
    sizes, ...)."""
    config = dict(vars(args), keras_version=keras.__version__)
    config.update(resolved)
    artifacts.write_json(os.path.join(folder, CONFIG_FILE), config)
