"""Which network? Training speed of every registered network, each from scratch with the fast
recipe, and transfer without internet (--init-from), as tables.

    python benchmarks/networks.py path/to/clothing-dataset-small --plan speed
    python benchmarks/networks.py path/to/clothing-dataset-small --plan transfer
    python benchmarks/networks.py path/to/clothing-dataset-small --plan scratch

The dataset folder holds train/, validation/ and test/, one sub-folder per class in each.

- speed: training images per second of each network at 64 px and at its recommended size
  (model.fit on random pixels in memory, batches of 64, the fast recipe's optimizer, this
  machine's precision), after a step of warm-up; no files written.
- transfer: vgg trained on five classes (SOURCE_CLASSES, the 15% split of train/), then on
  the other five with 20 and with 50 photos per class, once from that model (--init-from)
  and once from scratch, the same epochs; tested on those five classes' test/ photos. Runs
  named tune-* choose --head-epochs and --fine-tune-lr on validation/ alone.
- scratch: every network with --weights none and --recipe fast on the 15% split of
  train/, at the sizes and for the epochs given in SCRATCH.

Each run is train.py in its own process (recipes.py's run), the subsets folders of links
under --work.
"""

import argparse
import json
import os
import random
import sys
import time

import recipes

sys.path.insert(0, recipes.ROOT)

SOURCE_CLASSES = ("dress", "hat", "longsleeve", "outwear", "pants")
TARGET_CLASSES = ("shirt", "shoes", "shorts", "skirt", "t-shirt")
TRANSFER_FLAGS = ["--recipe", "fast"]
# (network, image size, epochs): the fast recipe's 25 epochs where they take at most about
# 10 minutes of training on a 2-core CPU, else as many as fit in about 10 (the speed plan).
SCRATCH = (("vgg", 64, 25), ("mobilenet_v3_small", 64, 25), ("mobilenet_v3_small", 224, 4),
           ("efficientnet_v2_b0", 64, 5), ("vgg16", 64, 2))


def build_parser():
    parser = argparse.ArgumentParser(
        description="Speed of each network, from scratch and transferred, as tables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="folder with train/, validation/ and test/")
    parser.add_argument("--plan", choices=("speed", "transfer", "scratch"), default="speed")
    parser.add_argument("--only", default=None, help="comma-separated run names of the plan")
    parser.add_argument("--work", default="benchmark-runs", help="output folders go here")
    parser.add_argument("--results", default=None, help="append each run's JSON line here")
    return parser


def subset(data, classes, per_class, work, name, seed=42):
    """A dataset folder under work with train/, validation/ and test/ of the given classes,
    train/ cut to per_class photos of each (None: all), drawn with seed: links, no copies."""
    root = os.path.join(work, name)
    for part in ("train", "validation", "test"):
        for label in classes:
            source = os.path.join(data, part, label)
            files = sorted(os.listdir(source))
            if part == "train" and per_class:
                files = sorted(random.Random(seed).sample(files, per_class))
            target = os.path.join(root, part, label)
            os.makedirs(target, exist_ok=True)
            for file in files:
                link = os.path.join(target, file)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(source, file)), link)
    return root


def transfer_plan(data, work):
    source_data = subset(data, SOURCE_CLASSES, None, work, "source-classes")
    source = os.path.join(work, "source-vgg", "vgg_model.keras")
    plan = {"source-vgg": (source_data, TRANSFER_FLAGS, "split")}
    fifty = subset(data, TARGET_CLASSES, 50, work, "target-50")
    for head_epochs, factor in ((2, 10), (5, 10), (5, 3)):
        lr = 0.003 / factor
        plan[f"tune-head{head_epochs}-lr{lr:g}"] = (fifty, TRANSFER_FLAGS + [
            "--init-from", source, "--head-epochs", str(head_epochs), "--fine-tune-lr",
            str(lr)], "validation")
    for per_class in (20, 50):
        target = subset(data, TARGET_CLASSES, per_class, work, f"target-{per_class}")
        plan[f"from-source-{per_class}"] = (target, TRANSFER_FLAGS + ["--init-from", source],
                                            "official")
        plan[f"from-scratch-{per_class}"] = (target, TRANSFER_FLAGS, "official")
    return plan


def scratch_plan(data):
    return {f"scratch-{name}-{size}": (data, [
        "--recipe", "fast", "--model", name, "--weights", "none", "--image-size", str(size),
        "--epochs", str(epochs)], "split") for name, size, epochs in SCRATCH}


def speed(batch=64):
    """Training images per second of every network at 64 px and its recommended size:
    model.fit on random pixels held in memory, timed after a first step that traces it."""
    import classifier  # noqa: F401  starts TensorFlow quietly
    import keras
    import numpy as np
    import tensorflow as tf

    from classifier import hardware, networks

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    policy = hardware.choose_precision("auto", hardware.gpu_capabilities(), hardware.cpu_flags())
    print(f"precision: {policy}, batch {batch}")
    print("| network | image size | parameters | training images/s |")
    print("| --- | --- | --- | --- |")
    for name, network in networks.REGISTRY.items():
        for size in sorted({64, network.recommended_size}):
            steps = 8 if size <= 64 else 2  # vgg16 at 224 px takes about a minute a step
            with hardware.dtype_policy(policy):
                model = networks.create(name, (size, size, 3), 10)
            model.compile(optimizer=keras.optimizers.AdamW(0.003),
                          loss="categorical_crossentropy")
            rng = np.random.default_rng(0)
            x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
            y = np.eye(10, dtype="float32")[rng.integers(0, 10, batch)]
            data = tf.data.Dataset.from_tensors((x, y)).repeat()
            model.fit(data, steps_per_epoch=1, verbose=0)  # traces the step: not timed
            timer = EpochTimer()
            model.fit(data, steps_per_epoch=steps, verbose=0, callbacks=[timer])
            rate = batch * steps / timer.seconds[-1]
            print(f"| {name} | {size} | {model.count_params():,} | {rate:.0f} |", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plan == "speed":
        speed()
        return 0
    os.makedirs(args.work, exist_ok=True)
    plan = (transfer_plan(args.data, args.work) if args.plan == "transfer"
            else scratch_plan(args.data))
    if args.only:
        plan = {name: plan[name] for name in args.only.split(",")}
    results = []
    for name, (data, flags, test) in plan.items():
        print(f"running {name}: train.py {' '.join(flags)} ({test}) ...", flush=True)
        row = recipes.run(name, data, flags, test, args.work)
        row["model"] = json.load(open(os.path.join(args.work, name, "config.json")))["model"]
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.results:
            with open(args.results, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    recipes.print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
