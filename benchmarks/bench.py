"""How fast this project loads, trains and predicts, beside the blog's way, on your data.

    python benchmarks/bench.py path/to/dataset [--epochs 4] [--scales 1,3,10]

Prints one table. Each measurement runs in its own process, so that its peak resident
memory is its own:

- blog: the blog's way. A single-threaded cv2.imread + cv2.resize loop, the whole dataset
  as one float64 array, ImageDataGenerator.flow feeding fit, a float32 model, and
  prediction one image at a time. (The pixels stay 0..255 rather than the blog's /255,
  because this project's model scales them itself: same dtype, memory and work.)
- ours: train.py's path: parallel DCT-reduced decoding, first into an empty cache (cold),
  then again from it (warm); training in memory with the defaults; predict.py on a folder.

Loading figures are the median of three passes, for the blog's loop as for ours.
- layers: the same with --augment layers.
- stream xK: --data-mode stream on the dataset repeated K times (symbolic links, so every
  copy is a separate file to decode and cache), for memory and time per epoch against size.

Training throughput counts training steps only (validation and the per-epoch saves are
left out): the median over the epochs after the first, which also traces the graph. Streams
at K > 1 run one epoch: their epoch time includes that start-up, and their images/s is
taken after the first few steps. The "model alone" row is the ceiling for any input
pipeline: train_on_batch on one fixed batch, no data loading or augmentation at all.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Steps of the first epoch left out of its steady rate.
WARM_UP = 3
# Loading takes seconds and varies by a fifth from one pass to the next: take the median.
LOAD_PASSES = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Benchmark loading, training and prediction against the blog's way.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dataset", help="folder with one sub-folder per class")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs for the blog, ours and layers rows (the first is not timed)")
    parser.add_argument("--scales", default="1,3,10",
                        help="dataset repetitions for the streaming rows")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--predict-images", type=int, default=300,
                        help="images labelled for the prediction figures")
    parser.add_argument("--only", default="blog,ours,layers,stream",
                        help="which rows to run, comma-separated")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    return parser


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def class_images(dataset):
    from classifier import images
    return [path for path in images.list_images(dataset) if images.label_of(path, dataset)]


def make_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Seconds from the start of each epoch to the end of its last training step, and
        the end time of every step of the first epoch."""

        def __init__(self):
            super().__init__()
            self.seconds, self.first_epoch_steps = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = self.last_step = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last_step = time.perf_counter()
            if not self.seconds:
                self.first_epoch_steps.append(self.last_step)

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(self.last_step - self.started)

    return StepTimer()


def training_figures(timer, images_per_epoch, batch_size):
    """Median over the epochs after the first; and, within the first epoch, the rate after
    its first WARM_UP steps (graph tracing, pipeline start), for runs of a single epoch."""
    per_epoch = statistics.median(timer.seconds[1:] or timer.seconds)
    steps = timer.first_epoch_steps
    steady = None
    if len(steps) > WARM_UP + 1:
        counted = min(images_per_epoch, len(steps) * batch_size) - (WARM_UP + 1) * batch_size
        steady = counted / (steps[-1] - steps[WARM_UP])
    return {"epoch_seconds": per_epoch, "train_images_per_s": images_per_epoch / per_epoch,
            "epoch_seconds_all": timer.seconds, "first_epoch_steady_images_per_s": steady,
            "train_images": images_per_epoch}


def run_blog(config):
    """The blog's way, kept as the blog wrote it where it still runs on Keras 3."""
    import cv2
    import keras
    import numpy as np
    from sklearn.model_selection import train_test_split
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    import vgg
    from classifier import artifacts, images, settings

    paths = class_images(config["dataset"])
    size = config["image_size"]
    load_seconds = []
    for _ in range(LOAD_PASSES):
        # Free the previous pass's float64 array before the clock starts: one copy at a
        # time, as the blog has, and its release is not loading time.
        data = labels = None
        started = time.perf_counter()
        data, labels = [], []
        for path in paths:
            image = cv2.imread(path)
            if image is None:
                continue
            data.append(cv2.resize(image, (size, size)))
            labels.append(images.label_of(path, config["dataset"]))
        data = np.array(data, dtype="float")
        load_seconds.append(time.perf_counter() - started)

    _, targets = artifacts.fit_binarizer(np.array(labels))
    train_x, test_x, train_y, test_y = train_test_split(data, targets, test_size=0.15,
                                                        random_state=42)
    defaults = settings.parse_args([])
    augmentation = ImageDataGenerator(
        rotation_range=defaults.rotation_range, width_shift_range=defaults.width_shift_range,
        height_shift_range=defaults.height_shift_range, shear_range=defaults.shear_range,
        zoom_range=defaults.zoom_range, horizontal_flip=True, fill_mode="nearest")
    keras.utils.set_random_seed(42)
    model = vgg.build_vgg((size, size, 3), targets.shape[1])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.0007),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    timer = make_timer()
    model.fit(augmentation.flow(train_x, train_y, batch_size=config["batch_size"]),
              validation_data=(test_x, test_y), epochs=config["epochs"], verbose=2,
              callbacks=[timer])
    accuracy = float(np.mean(model.predict(test_x, verbose=0).argmax(1) == test_y.argmax(1)))

    output = os.path.join(config["work"], "blog_predictions")
    os.makedirs(output, exist_ok=True)
    chosen = paths[:config["predict_images"]]
    started = time.perf_counter()
    for index, path in enumerate(chosen):
        image = cv2.imread(path)
        pixels = cv2.resize(image, (size, size)).astype("float")[None]
        probabilities = model.predict(pixels, verbose=0)[0]
        cv2.putText(image, f"{probabilities.max() * 100:.2f}%", (10, 25),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2)
        cv2.imwrite(os.path.join(output, f"{index}.jpg"), image)
    predict_seconds = time.perf_counter() - started
    return {"images": len(data),
            "load_images_per_s": len(paths) / statistics.median(load_seconds),
            "test_accuracy": accuracy, "predict_images_per_s": len(chosen) / predict_seconds,
            **training_figures(timer, len(train_x), config["batch_size"])}


def run_ours(config, extra_flags=(), measure_loading=True, measure_predict=True):
    import predict
    import train
    from classifier import image_cache, settings

    paths = class_images(config["dataset"])
    output = os.path.join(config["work"], config["name"])
    flags = ["--dataset", config["dataset"], "--output", output, "--logs",
             os.path.join(output, "logs"), "--epochs", str(config["epochs"]),
             "--image-size", str(config["image_size"]), "--batch-size",
             str(config["batch_size"]), "--keep-checkpoints", "1", *extra_flags]
    args = settings.parse_args(flags)
    result = {"images": len(paths)}
    if measure_loading:
        for kind in ("cold", "warm"):
            seconds = []
            for _ in range(LOAD_PASSES):
                if kind == "cold":
                    shutil.rmtree(args.cache_dir, ignore_errors=True)
                started = time.perf_counter()
                # The cache train.py itself reads next, so its training starts warm.
                rows, _, _, _ = image_cache.load_images(
                    paths, args.image_size, args.cache_dir, progress=False,
                    name=image_cache.folder_name(config["dataset"]))
                rows.load()
                seconds.append(time.perf_counter() - started)
            result[f"load_{kind}_images_per_s"] = len(paths) / statistics.median(seconds)
    timer = make_timer()
    summary = train.run(args, extra_callbacks=[timer])
    result.update(training_figures(timer, summary.training_images, args.batch_size),
                  test_accuracy=summary.test_accuracy, data_mode=summary.data_mode,
                  precision=summary.precision)
    if measure_predict:
        result["model_alone_images_per_s"] = model_alone_speed(args)
        folder = os.path.join(config["work"], "predict_input")
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for index, path in enumerate(paths[:config["predict_images"]]):
                os.symlink(os.path.abspath(path), os.path.join(folder, f"{index}.jpg"))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = predict.main(["--image", folder, "--model", summary.model, "--labels",
                                 os.path.join(output, "labels.pickle"), "--output",
                                 os.path.join(output, "predictions")])
        assert code == 0, "predict.py failed"
        result["predict_images_per_s"] = len(os.listdir(folder)) / (time.perf_counter() - started)
    return result


def model_alone_speed(args, steps=12):
    """Training images/s of the model on one fixed batch: no input pipeline at all."""
    import keras
    import numpy as np

    import vgg
    model = vgg.build_vgg((args.image_size, args.image_size, 3), 10)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.image_size,
                                                        args.image_size, 3)).astype("float32")
    targets = np.eye(10, dtype="float32")[np.arange(args.batch_size) % 10]
    for _ in range(3):
        model.train_on_batch(pixels, targets)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(pixels, targets)
    return steps * args.batch_size / (time.perf_counter() - started)


def repeated_dataset(dataset, times, work):
    """The dataset K times over, as symbolic links: K distinct files per image."""
    if times == 1:
        return dataset
    folder = os.path.join(work, f"data_x{times}")
    if os.path.isdir(folder):
        return folder
    for path in class_images(dataset):
        relative = os.path.relpath(path, dataset)
        label, name = relative.split(os.sep)[0], os.path.basename(relative)
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        for copy in range(times):
            os.symlink(os.path.abspath(path), os.path.join(folder, label, f"{copy}_{name}"))
    return folder


def child(name, config):
    if name == "blog":
        result = run_blog(config)
    elif name == "ours":
        result = run_ours(config)
    elif name == "layers":
        result = run_ours(config, ["--augment", "layers"], measure_loading=False,
                          measure_predict=False)
    else:
        result = run_ours(config, ["--data-mode", "stream"], measure_loading=False,
                          measure_predict=False)
    result["peak_memory_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result), flush=True)


def machine():
    from classifier import hardware
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import tensorflow as tf
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    policy = hardware.choose_precision("auto", hardware.gpu_capabilities(), hardware.cpu_flags())
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "precision": policy,
            "tensorflow": tf.__version__}


def run_child(name, config):
    """One measurement in a fresh Python process; its own output goes to a log file."""
    log_path = os.path.join(config["work"], f"{config['name']}.log")
    print(f"running {config['name']} (log: {log_path}) ...", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(
            [sys.executable, os.path.abspath(__file__), config["dataset"], "--child", name,
             "--child-config", json.dumps(config)], stdout=subprocess.PIPE, stderr=log, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_seconds"] = time.perf_counter() - started
            return result
    raise SystemExit(f"{config['name']} failed (exit {completed.returncode}): see {log_path}")


def ratio(numerator, denominator):
    return f"{numerator / denominator:.1f}x" if numerator and denominator else "-"


def number(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(facts, results, args):
    blog, ours, layers = (results.get(name, {}) for name in ("blog", "ours", "layers"))
    gpus = ", ".join(facts["gpus"]) or "none"
    print()
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, GPU: {gpus}, "
          f"TensorFlow {facts['tensorflow']}, precision policy: {facts['precision']}")
    print(f"dataset: {args.dataset} ({ours.get('images') or blog.get('images')} images), "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.epochs} epochs")
    rows = [
        ("loading, cold (images/s)", blog.get("load_images_per_s"),
         ours.get("load_cold_images_per_s")),
        ("loading, warm cache (images/s)", blog.get("load_images_per_s"),
         ours.get("load_warm_images_per_s")),
        ("training (images/s, epochs after the 1st)", blog.get("train_images_per_s"),
         ours.get("train_images_per_s")),
        ("  with --augment layers (images/s)", blog.get("train_images_per_s"),
         layers.get("train_images_per_s")),
        ("  the model alone, no input (images/s)", blog.get("train_images_per_s"),
         ours.get("model_alone_images_per_s")),
        ("peak memory (MB)", blog.get("peak_memory_mb"),
         ours.get("peak_memory_mb")),
        ("prediction (images/s)", blog.get("predict_images_per_s"),
         ours.get("predict_images_per_s")),
    ]
    print(f"\n{'':44}{'blog way':>12}{'ours':>12}{'ours/blog':>11}")
    for label, theirs, mine in rows:
        print(f"{label:44}{number(theirs, 1):>12}{number(mine, 1):>12}{ratio(mine, theirs):>11}")
    print(f"{'test accuracy after ' + str(args.epochs) + ' epochs':44}"
          f"{number(blog.get('test_accuracy'), 3):>12}{number(ours.get('test_accuracy'), 3):>12}")
    if layers:
        print(f"{'  with --augment layers':44}{'':>12}"
              f"{number(layers.get('test_accuracy'), 3):>12}")
    streams = [(int(name[len("stream_x"):]), result) for name, result in results.items()
               if name.startswith("stream_x")]
    if streams:
        base = min(streams)[1]
        print("\nstreaming (--data-mode stream), the dataset repeated K times:")
        print(f"{'K':>4}{'images':>9}{'trained':>9}{'epoch 1 s':>11}{'vs K=1':>8}"
              f"{'images/s':>10}{'s per 1k':>10}{'peak MB':>9}{'vs K=1':>8}")
        for times, result in sorted(streams):
            seconds = result["epoch_seconds_all"][0]
            steady = result["first_epoch_steady_images_per_s"]
            print(f"{times:>4}{result['images']:>9,}{result['train_images']:>9,}"
                  f"{seconds:>11.1f}{ratio(seconds, base['epoch_seconds_all'][0]):>8}"
                  f"{number(steady, 1):>10}{number(steady and 1000 / steady, 2):>10}"
                  f"{result['peak_memory_mb']:>9.0f}"
                  f"{ratio(result['peak_memory_mb'], base['peak_memory_mb']):>8}")
        print(f"(epoch 1 includes graph tracing; images/s and s per 1k images: epoch 1 after "
              f"its first {WARM_UP} steps)")
        if 1 in dict(streams):
            print(f"test accuracy after {args.epochs} epochs, streamed: "
                  f"{dict(streams)[1]['test_accuracy']:.3f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.child_config))
        return 0
    if not os.path.isdir(args.dataset):
        print(f"error: dataset folder not found: {args.dataset}", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="vgg-bench-")
    only = set(args.only.split(","))
    base = {"dataset": os.path.abspath(args.dataset), "work": work, "epochs": args.epochs,
            "image_size": args.image_size, "batch_size": args.batch_size,
            "predict_images": args.predict_images}
    results = {}
    try:
        for name in ("blog", "ours", "layers"):
            if name in only:
                results[name] = run_child(name, dict(base, name=name))
                print(json.dumps(results[name]), flush=True)
        if "stream" in only:
            for times in (int(value) for value in args.scales.split(",")):
                config = dict(base, name=f"stream_x{times}",
                              dataset=repeated_dataset(base["dataset"], times, work),
                              epochs=args.epochs if times == 1 else 1)
                results[config["name"]] = run_child("stream", config)
                print(json.dumps(results[config["name"]]), flush=True)
        facts = machine()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": facts, "results": results}, handle, indent=2)
    print_table(facts, results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
