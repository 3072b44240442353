"""Label new images with a model trained by train.py.

    python predict.py --image x.jpg [more.jpg folder/ ...]

Prints one line per image, `x.jpg: red_dress 97.42%`, and writes a copy of each image with
its label and confidence drawn on it into the output folder. Images are preprocessed by the
same code as in training (images.load_image), so colour order, resize and scale agree.
"""

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO chatter; warnings stay

import cv2
import imutils
import keras
import numpy as np

import artifacts
import images

log = logging.getLogger("predict")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Label images with a model trained by train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image", nargs="+", required=True, metavar="PATH",
                        help="image files or folders of images")
    parser.add_argument("--model", default=os.path.join("Output", artifacts.MODEL_FILE))
    parser.add_argument("--labels", default=os.path.join("Output", artifacts.LABELS_FILE))
    parser.add_argument("--output", default=os.path.join("Output", "predictions"),
                        help="folder for the annotated copies")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads for decoding images and writing the annotated copies")
    parser.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="refuse images whose header claims more pixels than this")
    parser.add_argument("--unsafe-model", action="store_true",
                        help="allow models whose Lambda layers carry Python code (only for "
                             "model files you trust: loading them runs that code)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def expand_inputs(inputs):
    """Files as given; folders replaced by the images below them. Missing paths are errors."""
    found, missing = [], []
    for path in inputs:
        if os.path.isdir(path):
            found.extend(images.list_images(path))
        elif os.path.isfile(path):
            found.append(path)
        else:
            missing.append(path)
    return found, missing


def load_model(path, unsafe=False):
    if not os.path.isfile(path):
        raise images.UserError(
            f"no model at {path}: train one first with `python train.py --dataset Dataset`")
    try:
        return keras.models.load_model(path, safe_mode=not unsafe)
    except ValueError as error:
        if "lambda" in str(error).lower():
            raise images.UserError(
                f"refusing to load {path}: it holds a Lambda layer with Python code, which "
                "would run on loading; pass --unsafe-model if you trust the file") from None
        raise images.UserError(f"cannot load the model {path}: {error}") from None
    except OSError as error:
        raise images.UserError(f"cannot load the model {path}: {error}") from None


def annotate(image_rgb, text):
    """A copy of the image, 400 pixels wide like the blog's figures, with text drawn on it."""
    canvas = imutils.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), width=400)
    cv2.rectangle(canvas, (0, 0), (400, 34), (0, 0, 0), -1)
    cv2.putText(canvas, text, (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2,
                cv2.LINE_AA)
    return canvas


def save_jpeg(path, image_bgr):
    """cv2.imwrite cannot write every file name on every system; Python's open can."""
    encoded = cv2.imencode(".jpg", image_bgr)[1]
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(encoded.tobytes())


def output_name(path, taken):
    """A file name inside the output folder: the input's base name, never a path, made unique."""
    stem, _ = os.path.splitext(os.path.basename(path))
    stem = stem.lstrip(".") or "image"
    name, counter = f"{stem}.jpg", 1
    while name in taken:
        counter += 1
        name = f"{stem}_{counter}.jpg"
    taken.add(name)
    return name


def predict(args):
    """Predict every input; return the number of inputs that failed."""
    model = load_model(args.model, args.unsafe_model)
    binarizer = artifacts.load_labels(args.labels)
    classes = [str(name) for name in binarizer.classes_]
    image_size = model.input_shape[1]
    if model.output_shape[-1] != len(classes):
        raise images.UserError(f"{args.labels} has {len(classes)} classes but {args.model} "
                               f"predicts {model.output_shape[-1]}: they come from different runs")
    info = artifacts.load_info(args.labels)
    if info and info.get("color_order", images.COLOR_ORDER) != images.COLOR_ORDER:
        raise images.UserError(f"{args.labels} was written for {info['color_order']} input")

    paths, missing = expand_inputs(args.image)
    for path in missing:
        print(f"{path}: error: no such file or folder", file=sys.stderr)
    os.makedirs(args.output, exist_ok=True)
    failures, taken = len(missing), set()

    def attempt_load(path):
        try:
            return path, images.load_image(path, image_size, args.max_pixels), None
        except images.ImageError as error:
            return path, None, error

    def write_copy(path, text, name):
        # The full-size picture for the annotated copy; the model saw load_image's pixels.
        original = images.decode_image(path, args.max_pixels)
        save_jpeg(os.path.join(args.output, name), annotate(original, text))

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for start in range(0, len(paths), args.batch_size):
            loaded = []
            for path, pixels, error in pool.map(attempt_load,
                                                paths[start:start + args.batch_size]):
                if error:
                    print(f"{path}: error: {error}", file=sys.stderr)
                    failures += 1
                else:
                    loaded.append((path, pixels))
            if not loaded:
                continue
            batch = np.stack([pixels for _, pixels in loaded]).astype("float32")
            copies = []
            for (path, _), probabilities in zip(loaded, model.predict_on_batch(batch)):
                best = int(np.argmax(probabilities))
                text = f"{classes[best]} {probabilities[best] * 100:.2f}%"
                print(f"{path}: {text}")
                copies.append(pool.submit(write_copy, path, text, output_name(path, taken)))
            for copy in copies:
                copy.result()  # a write error stops the run here, as it did before
    return failures


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        failures = predict(args)
    except images.UserError as error:
        log.error("%s", error)
        return 2
    except OSError as error:
        log.error("cannot write %s: %s", error.filename or args.output, error.strerror or error)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
