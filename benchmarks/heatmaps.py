"""Does the model look where the answer is? Grad-CAM heat maps (classifier/heatmaps.py) of a
network trained on images whose class is decided by one small coloured mark.

    python benchmarks/heatmaps.py [--model vgg] [--epochs 25] [--examples examples.png]

Each image is a cluttered gray background (gray rectangles, lines and noise, no colour) with
one filled disc or square, --mark of the side across, at a random place; its colour is the
class: red, green, blue (--colours), and a class "none" of images without a mark. Without
that class one colour is the network's answer when it sees neither of the others, its
evidence is everywhere but the mark, and so is its heat map (--no-unmarked shows it).

train.py trains --model on such images (train/, --per-class of each class) and tests it on
others (test/, whose marks' boxes marks.json remembers). Then each test image's heat map, at
the class the model predicted, is resized to the image, and its peak (the argmax) lies on
the mark's box or not. Printed, for the images with a mark: the share whose peak lies on the
box, and within --tolerance pixels of it (by default half a cell of the heat map, its
resolution: the peak lies at a cell's centre, the mark anywhere in the cell); the chance of
each (the box's area over the image's, the box widened by the tolerance); the mean share of
the map's sum on the box; each class's. Nothing is asserted here: tests/test_heatmaps.py
holds a short run to account.

The keras.applications networks get no ImageNet weights without a network: pass --weights
none with them. A run with the defaults takes about five minutes on two CPU cores.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Mark colours, RGB: saturated, as nothing in the gray clutter is.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230),
           "yellow": (230, 220, 30)}
UNMARKED = "none"
MARKS_FILE = "marks.json"
MARK = 0.15  # the mark's side (or diameter) as a share of the image's side
BATCH = 64  # images per call of the model when scoring


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train on images whose class is a small coloured mark, then count how "
                    "often the Grad-CAM heat map's peak lies on the mark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vgg", help="a network train.py knows (--model)")
    parser.add_argument("--weights", default=None,
                        help="train.py's --weights (none: random), for the keras.applications "
                             "networks; none given: train.py's default")
    parser.add_argument("--epochs", type=int, default=25, help="train.py's --epochs")
    parser.add_argument("--recipe", default="fast", help="train.py's --recipe")
    parser.add_argument("--batch-size", type=int, default=16, help="train.py's --batch-size")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=40, help="test images per class")
    parser.add_argument("--colours", type=int, choices=range(2, len(COLOURS) + 1), default=3,
                        help=f"mark colours, one class each, the first of {', '.join(COLOURS)}")
    parser.add_argument("--unmarked", action=argparse.BooleanOptionalAction, default=True,
                        help=f"a class \"{UNMARKED}\" of images without a mark")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--mark", type=float, default=MARK,
                        help="the mark's side (or diameter) as a share of the image's side")
    parser.add_argument("--tolerance", type=int, default=None,
                        help="pixels around the mark's box that still count as on it; none "
                             "means half a cell of the heat map")
    parser.add_argument("--seed", type=int, default=42, help="for the images and train.py")
    parser.add_argument("--workers", type=int, default=2, help="train.py's --workers")
    parser.add_argument("--examples", default=None, metavar="PNG",
                        help="write the first test images of each class and their heat maps "
                             "here, as a grid")
    parser.add_argument("--work", default="benchmark-runs/heatmaps",
                        help="the images, the run's output and logs go here")
    return parser


def clutter(rng, size):
    """A gray background, float RGB: a random level, gray rectangles and lines."""
    image = np.full((size, size), rng.integers(60, 200), np.float32)
    for _ in range(rng.integers(6, 12)):
        top_left = rng.integers(-size // 4, size, 2)
        extent = rng.integers(size // 10, size // 2, 2)
        cv2.rectangle(image, tuple(int(v) for v in top_left),
                      tuple(int(v) for v in top_left + extent), int(rng.integers(0, 256)), -1)
    for _ in range(rng.integers(3, 8)):
        ends = rng.integers(0, size, 4)
        cv2.line(image, (int(ends[0]), int(ends[1])), (int(ends[2]), int(ends[3])),
                 int(rng.integers(0, 256)), int(rng.integers(1, max(2, size // 32) + 1)))
    return np.repeat(image[:, :, None], 3, axis=2)


def mark_image(rng, size, colour, mark=MARK):
    """One image of the class colour (a colour of COLOURS, or UNMARKED): the clutter, a disc
    or square of that colour whose side is mark of the image's, and noise. Returns the RGB
    pixels and the mark's box (top, left, bottom, right; bottom and right exclusive), None
    for an image without a mark."""
    image, box = clutter(rng, size), None
    if colour != UNMARKED:
        side = max(3, int(round(mark * size)))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        shade = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, 3), 0, 255)
        ys, xs = np.mgrid[:side, :side]
        radius = side / 2
        shape = (np.ones((side, side), bool) if rng.random() < 0.5
                 else (ys + 0.5 - radius) ** 2 + (xs + 0.5 - radius) ** 2 <= radius ** 2)
        image[top:top + side, left:left + side][shape] = shade
        box = (top, left, top + side, left + side)
    # The same noise on the mark as around it: no patch stands out by being smooth.
    image += rng.normal(0, 8, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), box


def write_marks(folder, per_class, classes, size, seed, mark=MARK):
    """per_class PNGs of each class (mark_image's colours) into folder/<class>/, and
    folder/marks.json: each file's path relative to folder, with its class and its mark's
    box (null without a mark). Returns that record."""
    record = {}
    for class_index, colour in enumerate(classes):
        os.makedirs(os.path.join(folder, colour), exist_ok=True)
        for index in range(per_class):
            rng = np.random.default_rng([seed, class_index, index])
            image, box = mark_image(rng, size, colour, mark)
            name = os.path.join(colour, f"{colour}_{index:04d}.png")
            cv2.imwrite(os.path.join(folder, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            record[name] = {"class": colour, "box": list(box) if box else None}
    with open(os.path.join(folder, MARKS_FILE), "w") as handle:
        json.dump(record, handle, indent=1)
    return record


def peak(heat_map):
    """Where heat_map is highest, (row, column): its argmax, or where several pixels share
    the maximum, their centre (a resized map's edge cells are stretched flat to the border,
    and the first of their pixels would pull the peak into the image's corner)."""
    rows, columns = np.nonzero(heat_map >= heat_map.max())
    return int(round(rows.mean())), int(round(columns.mean()))


def peak_on_box(heat_map, box, tolerance=0):
    """Whether heat_map's peak lies within tolerance pixels of box (top, left, bottom, right;
    bottom and right exclusive)."""
    y, x = peak(heat_map)
    top, left, bottom, right = box
    return bool(top - tolerance <= y < bottom + tolerance
                and left - tolerance <= x < right + tolerance)


def box_share(box, size, tolerance=0):
    """The share of a size x size image that box, widened by tolerance, covers: the chance
    that a peak lies there."""
    top, left, bottom, right = box
    height = min(size, bottom + tolerance) - max(0, top - tolerance)
    width = min(size, right + tolerance) - max(0, left - tolerance)
    return height * width / size ** 2


def heat_share(heat_map, box):
    """The share of heat_map's sum on box; None for a map without heat."""
    total = float(heat_map.sum())
    top, left, bottom, right = box
    return float(heat_map[top:bottom, left:right].sum()) / total if total > 0 else None


@dataclass
class Scored:
    """A trained model on the test images: what it predicted, its heat maps at the predicted
    class (resized to the images), and what the images are."""
    classes: list
    pixels: np.ndarray
    true: np.ndarray
    predicted: np.ndarray
    maps: list
    boxes: list
    layer: str
    cell: float  # pixels of the image per cell of the heat map


def score(test_folder, record, model_path, labels_path):
    """Scored: the model at model_path (with the labels at labels_path) on the test images
    of record (write_marks's), in test_folder."""
    from classifier import artifacts, heatmaps, images

    model = artifacts.load_model(model_path)
    classes = [str(name) for name in artifacts.load_labels(labels_path).classes_]
    names = sorted(record)
    size = int(model.input_shape[1])
    pixels = np.stack([images.load_image(os.path.join(test_folder, name), size)
                       for name in names])
    explainer = heatmaps.Explainer(model)
    predicted, maps = [], []
    for start in range(0, len(names), BATCH):
        batch = pixels[start:start + BATCH]
        predicted.append(model.predict(batch, batch_size=BATCH, verbose=0).argmax(axis=1))
        maps += [heatmaps.resize_to(heat_map, size, size)
                 for heat_map in explainer.heat_maps(batch, predicted[-1])]
    cell = size / model.get_layer(explainer.layer_name).output.shape[1]
    return Scored(classes, pixels, np.array([classes.index(record[name]["class"])
                                             for name in names]),
                  np.concatenate(predicted), maps, [record[name]["box"] for name in names],
                  explainer.layer_name, cell)


def _mean(values):
    return float(np.mean(values)) if values else float("nan")


def summary(scored, tolerance=None, subset=None):
    """The numbers main prints of the images of subset (a boolean per image; None: all):
    the accuracy over them all, the rest over those with a mark. tolerance: pixels (None:
    half a cell of the heat map)."""
    tolerance = math.ceil(scored.cell / 2) if tolerance is None else tolerance
    chosen = np.ones(len(scored.true), bool) if subset is None else subset
    marked = [(heat_map, box) for heat_map, box, keep in zip(scored.maps, scored.boxes, chosen)
              if keep and box]
    size = scored.pixels.shape[1]
    shares = [heat_share(heat_map, box) for heat_map, box in marked]
    return {
        "images": int(chosen.sum()), "marked": len(marked),
        "accuracy": _mean(list(scored.predicted[chosen] == scored.true[chosen])),
        "on_mark": _mean([peak_on_box(heat_map, box) for heat_map, box in marked]),
        "chance": _mean([box_share(box, size) for _, box in marked]),
        "tolerance": tolerance,
        "near_mark": _mean([peak_on_box(heat_map, box, tolerance)
                            for heat_map, box in marked]),
        "chance_near": _mean([box_share(box, size, tolerance) for _, box in marked]),
        "heat_on_mark": _mean([share for share in shares if share is not None])}


def print_summary(scored, tolerance=None):
    """The summary of each class, of the images labelled right and of all, as a table;
    returns that of all."""
    overall = summary(scored, tolerance)
    tolerance = overall["tolerance"]
    print(f"| class | test images | accuracy | peak on the mark | within {tolerance} px "
          "| heat on the mark |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [(name, summary(scored, tolerance, scored.true == index))
            for index, name in enumerate(scored.classes)] + [
        ("labelled right", summary(scored, tolerance, scored.predicted == scored.true)),
        ("all", overall)]
    for name, numbers in rows:
        if numbers["marked"]:
            print(f"| {name} | {numbers['images']} | {numbers['accuracy']:.3f} | "
                  f"{numbers['on_mark']:.3f} | {numbers['near_mark']:.3f} | "
                  f"{numbers['heat_on_mark']:.3f} |")
        else:
            print(f"| {name} | {numbers['images']} | {numbers['accuracy']:.3f} | | | |")
    print(f"| chance | | | {overall['chance']:.3f} | {overall['chance_near']:.3f} | "
          f"{overall['chance']:.3f} |")
    return overall


def save_examples(path, scored, per_class=4):
    """A grid of the first per_class test images of each class and their heat maps in jet
    colours, each titled with its class and the class predicted, the mark's box in white,
    the peak a white cross."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    from classifier import heatmaps

    chosen = [index for label in range(len(scored.classes))
              for index in np.flatnonzero(scored.true == label)[:per_class]]
    rows = len(scored.classes)
    figure, axes = plt.subplots(rows, per_class * 2, figsize=(per_class * 3.2, rows * 1.8),
                                layout="constrained", squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for place, index in enumerate(chosen):
        image, heat_map, box = scored.pixels[index].astype(np.uint8), scored.maps[index], \
            scored.boxes[index]
        shown = heatmaps.overlay(image, heat_map)
        if box:
            top, left, bottom, right = box
            cv2.rectangle(shown, (left - 1, top - 1), (right, bottom), (255, 255, 255), 1)
        y, x = peak(heat_map)
        picture, explained = axes.flat[2 * place], axes.flat[2 * place + 1]
        picture.imshow(image)
        picture.set_title(scored.classes[scored.true[index]], fontsize=8)
        explained.imshow(shown)
        explained.plot([x], [y], "w+", markersize=9, markeredgewidth=2)
        explained.set_title(f"as {scored.classes[scored.predicted[index]]}", fontsize=8)
    figure.suptitle(f"Grad-CAM of layer {scored.layer} at the predicted class: the mark's "
                    "box white, the peak +", fontsize=10)
    figure.savefig(path)
    plt.close(figure)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import train
    from classifier import artifacts

    classes = list(COLOURS)[:args.colours] + ([UNMARKED] if args.unmarked else [])
    data = os.path.join(args.work, "data")
    started = time.perf_counter()
    # Fewer images than last time must not leave last time's in the dataset.
    shutil.rmtree(data, ignore_errors=True)
    write_marks(os.path.join(data, "train"), args.per_class, classes, args.image_size,
                args.seed, args.mark)
    # Another seed: no test image is a training image.
    record = write_marks(os.path.join(data, "test"), args.test_per_class, classes,
                         args.image_size, args.seed + 1, args.mark)
    output = os.path.join(args.work, f"{args.model}-output")
    flags = ["--dataset", os.path.join(data, "train"), "--test-dir", os.path.join(data, "test"),
             "--output", output, "--logs", os.path.join(args.work, "logs"),
             "--model", args.model, "--image-size", str(args.image_size),
             "--epochs", str(args.epochs), "--recipe", args.recipe,
             "--batch-size", str(args.batch_size), "--workers", str(args.workers),
             "--seed", str(args.seed), "--fresh"]
    if args.weights:
        flags += ["--weights", args.weights]
    code = train.main(flags)
    if code != 0:
        print(f"train.py failed (exit {code})")
        return code
    trained = time.perf_counter()
    labels = os.path.join(output, artifacts.LABELS_FILE)
    scored = score(os.path.join(data, "test"), record, artifacts.model_path(None, labels),
                   labels)
    side = max(3, int(round(args.mark * args.image_size)))
    cells = round(args.image_size / scored.cell)
    print(f"\n{args.model}, {args.epochs} epochs of --recipe {args.recipe}, "
          f"{args.per_class} training images per class, classes {', '.join(classes)}; "
          f"{args.image_size}x{args.image_size} px, the mark {side} px across; heat maps of "
          f"layer {scored.layer}, {cells}x{cells} (a cell is {scored.cell:g} px)\n")
    overall = print_summary(scored, args.tolerance)
    print(f"\ntest accuracy {overall['accuracy']:.3f}; the heat map's peak on the mark "
          f"{overall['on_mark']:.3f} (chance {overall['chance']:.3f}), within "
          f"{overall['tolerance']} px of it {overall['near_mark']:.3f} (chance "
          f"{overall['chance_near']:.3f})")
    print(f"wall time: {trained - started:.0f} s to write the images and train, "
          f"{time.perf_counter() - trained:.0f} s to score")
    if args.examples:
        save_examples(args.examples, scored)
        print(f"examples: {args.examples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
