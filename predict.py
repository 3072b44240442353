"""Label new images with a model trained by train.py.

    python predict.py --image x.jpg [more.jpg folder/ "photos/**/*.jpg" ...]

Prints one line per image, `x.jpg: red_dress 97.42%` (the top --top-k classes; for a model
trained with --multi-label, every label whose probability reaches --threshold), or the
results as CSV or JSON (--format, --results), and writes a copy of each image with its
labels and confidences drawn on it into the output folder, and on request a montage of them.
Images are preprocessed by the same code as in training (images.load_image), so colour
order, resize and scale agree.
"""

import argparse
import csv
import glob
import io
import json
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import imutils
import numpy as np
from tqdm import tqdm

from classifier import artifacts, calibration, cli, heatmaps, images, inference
from classifier.cli import Range, UserError

log = logging.getLogger("predict")

FORMATS = ("table", "csv", "json")
# The montage shows the first images only: a grid of thousands could not be read anyway.
MONTAGE_COLUMNS, MONTAGE_ROWS, TILE = 8, 8, 200
RANGES = {"top_k": Range(1), "threshold": Range(0, 1, low_open=True, high_open=True),
          "min_confidence": Range(0, 1), "batch_size": Range(1), "workers": Range(1),
          "max_pixels": Range(1)}
UNKNOWN = "unknown"
KNOWN_COLOUR, UNKNOWN_COLOUR = (0, 255, 0), (0, 165, 255)  # BGR: green, orange


def build_parser():
    parser = argparse.ArgumentParser(
        description="Label images with a model trained by train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inputs = parser.add_argument_group("images")
    inputs.add_argument("--image", nargs="+", required=True, metavar="PATH",
                        help="image files, folders of images, or glob patterns ('**' recurses)")
    inputs.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="refuse images whose header claims more pixels than this")
    inputs.add_argument("--batch-size", type=int, default=32, help="images per model call")
    inputs.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads for decoding images and writing the annotated copies")
    labelling = parser.add_argument_group("model and labels")
    artifacts.add_model_flags(labelling)
    inference.add_tta_flag(labelling)
    labelling.add_argument("--top-k", type=int, default=1,
                           help="classes reported per image (single-label models)")
    inference.add_answer_flags(labelling, UNKNOWN)
    labelling.add_argument("--explain", action="store_true",
                           help="write a Grad-CAM heat map of each image's top class, "
                                "<name>_heatmap.png, and draw it over the annotated copy")
    results = parser.add_argument_group("output")
    results.add_argument("--format", choices=FORMATS, default="table",
                         help="table: 'path: label 97.42%%' lines; csv: path,rank,label,"
                              "probability,error rows (and answer, with --min-confidence); "
                              "json: a list of objects")
    results.add_argument("--results", default=None,
                         help="write the results to this file instead of the standard output")
    results.add_argument("--output", default=os.path.join(artifacts.OUTPUT, "predictions"),
                         help="folder for the annotated copies")
    results.add_argument("--annotate", action=argparse.BooleanOptionalAction, default=True,
                         help="write an annotated copy of each image into --output")
    results.add_argument("--montage", default=None, metavar="FILE",
                         help=f"also write a grid of the first {MONTAGE_COLUMNS * MONTAGE_ROWS} "
                              "annotated images to this picture")
    results.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def expand_inputs(inputs):
    """Files as given; folders replaced by the images below them (a folder without any stays,
    to be reported); glob patterns by the image files and folders they match. Missing paths,
    and patterns matching nothing, are errors."""
    found, missing = [], []
    for path in inputs:
        if os.path.isdir(path):
            found.extend(images.list_images(path) or [path])
        elif os.path.isfile(path):
            found.append(path)
        elif any(character in path for character in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            for match in matches:
                if os.path.isdir(match):
                    found.extend(images.list_images(match))
                elif match.lower().endswith(images.IMAGE_EXTENSIONS):
                    found.append(match)
            if not matches:
                missing.append(path)
        else:
            missing.append(path)
    return found, missing


def annotate(image_rgb, lines, colour=KNOWN_COLOUR):
    """A copy of the image, 400 pixels wide like the blog's figures, with one line of text
    per label drawn on it."""
    canvas = imutils.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), width=400)
    cv2.rectangle(canvas, (0, 0), (400, 10 + 28 * len(lines)), (0, 0, 0), -1)
    for row, text in enumerate(lines):
        cv2.putText(canvas, text, (10, 29 + 28 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                    colour, 2, cv2.LINE_AA)
    return canvas


def tile(image_rgb, lines, colour=KNOWN_COLOUR):
    """One square cell of the montage, the labels on a band at its top."""
    cell = cv2.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), (TILE, TILE),
                      interpolation=cv2.INTER_AREA)
    cv2.rectangle(cell, (0, 0), (TILE, 6 + 16 * len(lines)), (0, 0, 0), -1)
    for row, text in enumerate(lines):
        cv2.putText(cell, text, (4, 17 + 16 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    colour, 1, cv2.LINE_AA)
    return cell


def chosen_labels(probabilities, classes, multi_label, top_k, threshold):
    """(label, probability) pairs to report, the most probable first: the top_k classes, or
    for a multi-label model every label at or above threshold."""
    ranked = np.argsort(probabilities)[::-1]
    if multi_label:
        ranked = [index for index in ranked if probabilities[index] >= threshold]
    else:
        ranked = ranked[:top_k]
    return [(classes[index], float(probabilities[index])) for index in ranked]


def save_montage(path, tiles):
    columns = min(MONTAGE_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    montage = imutils.build_montages(tiles, (TILE, TILE), (columns, rows))[0]
    save_jpeg(path, montage)


def table_line(result):
    if "error" in result:
        return f"{result['path']}: error: {result['error']}"
    labels = ", ".join(f"{label} {probability * 100:.2f}%"
                       for label, probability in result["predictions"]) or "no label"
    return f"{result['path']}: " + (f"{UNKNOWN} ({labels})" if result.get("unknown") else labels)


def answer(result, multi_label):
    """What the model answers for an image under --min-confidence: unknown, its class, or
    for a multi-label model the list of its labels."""
    if result.get("unknown"):
        return UNKNOWN
    labels = [label for label, _ in result["predictions"]]
    return labels if multi_label else labels[0]


def format_results(results, kind, answers=False, multi_label=False):
    """The results as the text of a table, CSV or JSON file; answers: with each image's
    answer (--min-confidence)."""
    if kind == "table":
        return "".join(table_line(result) + "\n" for result in results)
    if kind == "json":
        return json.dumps([
            {"path": result["path"], "error": result["error"]} if "error" in result else
            {"path": result["path"], **({"answer": answer(result, multi_label)} if answers
                                        else {}),
             "predictions": [{"label": label, "probability": probability}
                             for label, probability in result["predictions"]],
             **({"heatmap": result["heatmap"]} if "heatmap" in result else {})}
            for result in results], indent=2) + "\n"
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "probability", "error"] + ["answer"] * answers)
    for result in results:
        if "error" in result:
            writer.writerow([result["path"], "", "", "", result["error"]] + [""] * answers)
            continue
        said = answer(result, multi_label) if answers else ""
        said = ";".join(said) if isinstance(said, list) else said
        for rank, (label, probability) in enumerate(result["predictions"], start=1):
            writer.writerow([result["path"], rank, label, f"{probability:.6f}", ""]
                            + [said] * answers)
        if not result["predictions"] and answers:  # a multi-label image with no label
            writer.writerow([result["path"], "", "", "", "", said])
    return text.getvalue()


def save_jpeg(path, image_bgr, kind=".jpg"):
    """cv2.imwrite cannot write every file name on every system; Python's open can."""
    encoded = cv2.imencode(kind, image_bgr)[1]
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(encoded.tobytes())


def heatmap_name(name):
    return os.path.splitext(name)[0] + "_heatmap.png"


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


def load_trained(args):
    """The model and its class names, checked against each other; whether it is multi-label."""
    model_path = artifacts.model_path(args.model, args.labels)
    model = artifacts.load_model(model_path, args.unsafe_model)
    binarizer = artifacts.load_labels(args.labels)
    classes = [str(name) for name in binarizer.classes_]
    if model.output_shape[-1] != len(classes):
        raise UserError(f"{args.labels} has {len(classes)} classes but {model_path} predicts "
                        f"{model.output_shape[-1]}: they come from different runs")
    info = artifacts.load_info(args.labels)
    if info and info.get("color_order", images.COLOR_ORDER) != images.COLOR_ORDER:
        raise UserError(f"{args.labels} was written for {info['color_order']} input")
    return model, classes, artifacts.is_multi_label(binarizer)


class Labeller:
    """Labels batches of image files with the model and draws the pictures: the annotated
    copies in --output, and the first tiles of the --montage."""

    def __init__(self, args, model, classes, multi_label):
        self.args, self.model, self.classes, self.multi_label = args, model, classes, multi_label
        self.image_size = model.input_shape[1]
        self.top_k = max(1, min(args.top_k, len(classes)))
        self.montage_size = MONTAGE_COLUMNS * MONTAGE_ROWS if args.montage else 0
        self.taken, self.tiles = set(), []
        self.explainer = heatmaps.Explainer(model) if args.explain else None

    def label(self, paths, pool, streaming):
        """The result of each path, a dict with "predictions" or "error"; lines go out as
        images are labelled when streaming, errors always (on stderr)."""
        results, loaded = [], []
        for path, pixels, error in pool.map(self.attempt_load, paths):
            if error:
                results.append({"path": path, "error": error})
                print(table_line(results[-1]), file=sys.stderr)
            else:
                loaded.append((path, pixels))
        if not loaded:
            return results
        batch = np.stack([pixels for _, pixels in loaded]).astype("float32")
        drawings = []
        found = inference.probabilities(self.model, batch, self.args.tta)
        unsure = calibration.confidence(found, self.multi_label) < self.args.min_confidence
        # The evidence for the top class of the image itself (not its mirror image).
        maps = (self.explainer.heat_maps(batch, found.argmax(axis=1)) if self.explainer
                else [None] * len(loaded))
        for (path, _), probabilities, unknown, heat_map in zip(loaded, found, unsure, maps):
            predictions = chosen_labels(probabilities, self.classes, self.multi_label,
                                        self.top_k, self.args.threshold)
            results.append({"path": path, "predictions": predictions, "unknown": unknown})
            if streaming:
                print(table_line(results[-1]))
            # The blog draws the top class; a multi-label image gets each of its labels.
            lines = [f"{label} {probability * 100:.2f}%" for label, probability in
                     (predictions if self.multi_label else predictions[:1])] or ["no label"]
            if unknown:
                lines = [UNKNOWN] + [f"({line})" for line in lines]
            want_tile = len(self.tiles) + len(drawings) < self.montage_size
            if self.args.annotate or want_tile or heat_map is not None:
                name = (output_name(path, self.taken)
                        if self.args.annotate or heat_map is not None else None)
                if heat_map is not None:
                    results[-1]["heatmap"] = os.path.join(self.args.output, heatmap_name(name))
                drawings.append(pool.submit(self.draw, path, lines, name, want_tile,
                                            UNKNOWN_COLOUR if unknown else KNOWN_COLOUR,
                                            heat_map))
        for drawing in drawings:
            cell = drawing.result()  # a write error stops the run here
            if cell is not None:
                self.tiles.append(cell)
        return results

    def attempt_load(self, path):
        if os.path.isdir(path):  # expand_inputs keeps a folder without images
            return path, None, "no image files in this folder"
        try:
            return path, images.load_image(path, self.image_size, self.args.max_pixels), None
        except images.ImageError as error:
            return path, None, str(error)

    def draw(self, path, lines, name, want_tile, colour, heat_map):
        # The full-size picture for the pictures; the model saw load_image's pixels, which
        # are the whole picture squashed to a square: the map stretches back onto it.
        original = images.decode_image(path, self.args.max_pixels)
        if heat_map is not None:
            height, width = original.shape[:2]
            save_jpeg(os.path.join(self.args.output, heatmap_name(name)),
                      heatmaps.grayscale_png_pixels(heatmaps.resize_to(heat_map, height,
                                                                       width)), ".png")
            original = heatmaps.overlay(original, heat_map)
        if name and self.args.annotate:
            save_jpeg(os.path.join(self.args.output, name), annotate(original, lines, colour))
        return tile(original, lines, colour) if want_tile else None


def predict(args):
    """Predict every input; return the number of inputs that failed."""
    cli.check_ranges(args, RANGES)
    labeller = Labeller(args, *load_trained(args))
    paths, missing = expand_inputs(args.image)
    results = [{"path": path, "error": "no such file or folder"} for path in missing]
    for result in results:
        print(table_line(result), file=sys.stderr)
    # Lines go out as images are labelled, unless the whole table is going to a file.
    streaming = args.format == "table" and not args.results
    os.makedirs(args.output, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.workers) as pool, \
            tqdm(total=len(paths), desc="predicting", unit="img", file=sys.stderr,
                 disable=len(paths) <= args.batch_size or None) as bar:
        for start in range(0, len(paths), args.batch_size):
            results += labeller.label(paths[start:start + args.batch_size], pool, streaming)
            bar.update(min(args.batch_size, len(paths) - start))
    answers = {"answers": args.min_confidence > 0, "multi_label": labeller.multi_label}
    if args.results:
        with artifacts.atomic_path(args.results) as temporary:
            with open(temporary, "w", encoding="utf-8", newline="") as handle:
                handle.write(format_results(results, args.format, **answers))
    elif not streaming:
        sys.stdout.write(format_results(results, args.format, **answers))
    if labeller.tiles:
        save_montage(args.montage, labeller.tiles)
    return sum("error" in result for result in results)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    return cli.run(lambda: 1 if predict(args) else 0, log, where=args.output)


if __name__ == "__main__":
    sys.exit(main())
