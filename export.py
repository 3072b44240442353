"""Export a model trained by train.py for use outside Keras: TensorFlow SavedModel, TFLite
(LiteRT) or ONNX.

    python main.py export --format savedmodel|tflite|onnx
    python export.py --format tflite

The scaling to [0, 1] is the model's first layer, so every exported model takes what
images.load_image gives: RGB pixels 0..255 as float32, shape (batch, N, N, 3), N being the
training --image-size, decoded and resized (area interpolation) like images.load_image.
It returns one probability per class, in the order of the classes in labels.json, which is
copied beside the exported model.
"""

import argparse
import importlib.util
import logging
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO chatter; warnings stay

import numpy as np

import artifacts
import images

log = logging.getLogger("export")

# --format: (Keras's export format, default file name, the packages it needs)
FORMATS = {
    "savedmodel": ("tf_saved_model", "vgg_savedmodel", ()),
    "tflite": ("litert", "vgg_model.tflite", ()),
    "onnx": ("onnx", "vgg_model.onnx", ("tf2onnx", "onnx")),
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Export a trained model as a SavedModel, TFLite or ONNX model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--format", choices=FORMATS, default="savedmodel")
    parser.add_argument("--model", default=os.path.join("Output", artifacts.MODEL_FILE))
    parser.add_argument("--labels", default=os.path.join("Output", artifacts.LABELS_FILE),
                        help="its labels; labels.json beside it is copied with the export")
    parser.add_argument("--output", default=None,
                        help="where to write; none means Output/export/vgg_savedmodel, "
                             "Output/export/vgg_model.tflite or Output/export/vgg_model.onnx")
    parser.add_argument("--unsafe-model", action="store_true",
                        help="allow models whose Lambda layers carry Python code")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def export(args):
    """Write the exported model; return its path."""
    keras_format, default_name, needed = FORMATS[args.format]
    for package in needed:
        if importlib.util.find_spec(package) is None:
            raise images.UserError(
                f"--format {args.format} needs the {package} package: "
                f"pip install -r requirements.txt")
    model = artifacts.load_model(args.model, args.unsafe_model)
    # Keras's ONNX export refuses a model that has never been called since loading.
    model(np.zeros((1, *model.input_shape[1:]), "float32"))
    labels_json = os.path.join(os.path.dirname(args.labels), artifacts.LABELS_JSON)
    if not os.path.isfile(labels_json):
        raise images.UserError(f"no {labels_json}: export the model of a complete training run")
    target = args.output or os.path.join("Output", "export", default_name)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    # Written beside the target first, so a failed export never leaves half a model there.
    partial = os.path.join(folder, ".partial-" + os.path.basename(target))
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.export(partial, format=keras_format, verbose=False)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
        elif os.path.exists(partial):
            os.remove(partial)
    shutil.copyfile(labels_json, os.path.join(folder, artifacts.LABELS_JSON))
    return target


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        target = export(args)
    except images.UserError as error:
        log.error("%s", error)
        return 2
    except OSError as error:
        log.error("cannot write %s: %s", error.filename or args.output, error.strerror or error)
        return 2
    print(f"exported: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
