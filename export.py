"""Export a model trained by train.py for use outside Keras: TensorFlow SavedModel, TFLite
(LiteRT) or ONNX.

    python main.py export --format savedmodel|tflite|onnx
    python export.py --format tflite

The scaling to [0, 1] is the model's first layer, so every exported model takes what
images.load_image gives: RGB pixels 0..255 as float32, shape (batch, N, N, 3), N being the
training --image-size, decoded and resized (area interpolation) like images.load_image.
It returns one probability per class, in the order of the classes in labels.json, which is
copied beside the exported model. An exported model computes in float32, also when training
ran in mixed precision: the converters refuse mixed bfloat16 or float16 graphs, and the
runtimes compute in float32 on most machines.
"""

import argparse
import importlib.util
import logging
import os
import shutil
import sys

import classifier  # noqa: F401  first: it starts TensorFlow quietly, before keras does (cli.py)
import numpy as np

from classifier import artifacts, cli, networks
from classifier.cli import UserError

log = logging.getLogger("export")

# --format: (Keras's export format, default file name after the network's, the packages it
# needs)
FORMATS = {
    "savedmodel": ("tf_saved_model", "{network}_savedmodel", ()),
    "tflite": ("litert", "{network}_model.tflite", ()),
    "onnx": ("onnx", "{network}_model.onnx", ("tf2onnx", "onnx")),
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Export a trained model as a SavedModel, TFLite or ONNX model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--format", choices=FORMATS, default="savedmodel")
    artifacts.add_model_flags(parser)
    parser.add_argument("--output", default=None,
                        help="where to write; none means Output/export/vgg_savedmodel, "
                             "Output/export/vgg_model.tflite or Output/export/vgg_model.onnx "
                             "(for another network, its name in place of vgg); "
                             "labels.json is copied beside it")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def export(args):
    """Write the exported model; return its path."""
    keras_format, default_name, needed = FORMATS[args.format]
    for package in needed:
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"--format {args.format} needs the {package} package: "
                f"pip install -r requirements.txt")
    model = networks.with_dtype_policy(
        artifacts.load_model(artifacts.model_path(args.model, args.labels), args.unsafe_model),
        "float32")
    # Keras's ONNX export refuses a model that has never been called since loading.
    model(np.zeros((1, *model.input_shape[1:]), "float32"))
    labels_json = os.path.join(os.path.dirname(args.labels), artifacts.LABELS_JSON)
    if not os.path.isfile(labels_json):
        raise UserError(f"no {labels_json}: export the model of a complete training run")
    network = (artifacts.load_info(args.labels) or {}).get("network", networks.DEFAULT)
    target = args.output or os.path.join(artifacts.OUTPUT, "export",
                                         default_name.format(network=network))
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    with artifacts.atomic_path(target) as temporary:
        model.export(temporary, format=keras_format, verbose=False)
    shutil.copyfile(labels_json, os.path.join(folder, artifacts.LABELS_JSON))
    return target


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)

    def run():
        print(f"exported: {export(args)}")
        return 0

    return cli.run(run, log, where=args.output or "the export")


if __name__ == "__main__":
    sys.exit(main())
