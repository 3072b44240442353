"""One entry point, like the blog's main.py.

    python main.py                       the demo: fill an empty Dataset/ with generated images,
                                         train, evaluate and label a few held-back images
    python main.py train [train flags]   the same as python train.py [flags]
    python main.py predict [flags]       the same as python predict.py [flags]
    python main.py export [flags]        the same as python export.py [flags]: --format
                                         savedmodel, tflite or onnx
    python main.py serve [flags]         the same as python serve.py [flags]: a web page and
                                         an HTTP API at http://127.0.0.1:8000
    python main.py -train                the original repository's spellings also work
    python main.py -predict PATH
"""

import logging
import os
import sys

import demo
import export
import predict
import serve
import train
from classifier import artifacts, cli, images, settings

log = logging.getLogger("main")

DATASET = "Dataset"
DEMO_MARKER = ".demo-dataset"  # hidden, so the loader never takes it for an image
DEMO_PER_CLASS = 100
# 32x32 inputs, and lighter augmentation since the demo images already vary in pose: sized
# to finish within minutes on a laptop's CPU and still label most test images right.
DEMO_TRAIN_FLAGS = ["--image-size", "32", "--epochs", "16", "--batch-size", "32", "--lr", "0.001",
                    "--rotation-range", "10", "--shear-range", "0.05", "--zoom-range", "0.1"]


def dataset_is_empty(folder):
    return not os.path.isdir(folder) or not images.list_images(folder)


def run_demo(per_class=DEMO_PER_CLASS, train_flags=DEMO_TRAIN_FLAGS, run_training=train.run):
    """Generate the demo dataset into an empty Dataset/ (per_class images of each class),
    train on it with train_flags through run_training (train.run), and label a few images
    the model has never seen. A Dataset/ of the user's own images trains with the defaults."""
    output = artifacts.OUTPUT
    if dataset_is_empty(DATASET):
        log.info("%s/ holds no images: generating the demo dataset into it", DATASET)
        demo.generate(DATASET, per_class, seed=42)
        open(os.path.join(DATASET, DEMO_MARKER), "w").close()
    is_demo = os.path.exists(os.path.join(DATASET, DEMO_MARKER))
    flags = ["--dataset", DATASET, "--output", output] + (list(train_flags) if is_demo else [])
    if not is_demo:
        log.info("training on your images in %s/ with the default settings", DATASET)
    summary = run_training(settings.parse_args(flags))

    predictions = os.path.join(output, "predictions")
    if is_demo:
        # Drawn with another seed: images the model has never seen, one per class.
        samples = demo.generate(os.path.join(output, "demo_samples"), 1, seed=2024)
        print("\nPredictions on held-back demo images (true class in the file name):")
        predict.main(["--image", *samples, "--output", predictions])

    print(f"\nmodel:          {summary.model}")
    print(f"labels:         {os.path.join(output, artifacts.LABELS_FILE)}")
    print(f"reports, plots: {output}/ (classification_report.txt, training_plot.png, "
          "confusion_matrix.png)")
    print(f"checkpoints:    {os.path.join(output, 'checkpoints')}")
    if is_demo:
        print(f"predictions:    {predictions}")
    print(f"TensorBoard:    tensorboard --logdir {os.path.dirname(summary.tensorboard_run)}")
    print(f"trained {summary.epochs_run} epochs in {summary.seconds:.0f} s")
    print(f"test accuracy: {summary.test_accuracy:.2f}")
    return summary.interrupted


def main(argv=None, **demo_options):
    """Dispatch to train.py, predict.py, export.py or serve.py, or run the demo with
    demo_options (run_demo's)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "-train"):
        return train.main(argv[1:])
    if argv and argv[0] == "export":
        return export.main(argv[1:])
    if argv and argv[0] == "serve":
        return serve.main(argv[1:])
    if argv and argv[0] in ("predict", "-predict"):
        rest = argv[1:]
        if argv[0] == "-predict" and rest and not rest[0].startswith("-"):
            rest = ["--image", rest[0]] + rest[1:]
        return predict.main(rest)
    if argv:
        print(__doc__, file=sys.stderr if argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[0] in ("-h", "--help") else 2
    cli.setup_logging()
    return cli.run(lambda: run_demo(**demo_options), log)


if __name__ == "__main__":
    sys.exit(main())
