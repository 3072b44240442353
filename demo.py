"""A generated stand-in for the blog's dataset: photo-like JPEGs of its eight classes.

Each image is a garment silhouette (dress, pants or shoes) with its own proportions, pose,
size and position, coloured with shade and lighting variation, on a textured or cluttered
background, with sensor noise, blur and JPEG compression. Colour alone cannot tell
black_dress from black_pants, nor shape red_dress from blue_dress: a model needs both.
The same seed always gives the same images.

    python demo.py Dataset                      # the eight classes, 100 images each
    python demo.py BlueShoes --classes blue_shoes --per-class 50 --seed 7

Any colour_kind pair can be drawn, also one the eight classes lack (blue_shoes): what a
multi-label model never saw as a class.
"""

import argparse
import os
import sys

import cv2
import numpy as np

CLASSES = ("black_dress", "black_pants", "blue_dress", "blue_pants", "green_shoes",
           "red_dress", "red_shoes", "white_dress")
IMAGE_SIZE = 96

# Garment colours as OpenCV HSV centres (hue 0..179): (hue, saturation range, value range).
_COLORS = {
    "black": (None, (0, 60), (15, 70)),
    "white": (None, (0, 30), (200, 250)),
    "red": (0, (150, 255), (110, 230)),
    "blue": (112, (140, 255), (90, 220)),
    "green": (60, (120, 255), (80, 210)),
    "yellow": (28, (150, 255), (170, 240)),
    "cyan": (90, (140, 255), (120, 230)),
    "purple": (140, (120, 255), (90, 210)),
}


def _dress(rng):
    waist = rng.uniform(0.38, 0.5)
    shoulder = rng.uniform(0.16, 0.24)
    hem = rng.uniform(0.3, 0.48)
    hem_y = rng.uniform(0.9, 1.0)
    points = [(-0.07, 0.0), (-shoulder, 0.05), (-shoulder + 0.02, 0.2), (-0.12, waist),
              (-hem, hem_y), (-hem * 0.3, hem_y + 0.03), (hem * 0.3, hem_y + 0.03), (hem, hem_y),
              (0.12, waist), (shoulder - 0.02, 0.2), (shoulder, 0.05), (0.07, 0.0),
              (0.0, rng.uniform(0.05, 0.14))]
    polygons = [points]
    if rng.random() < 0.5:  # short sleeves
        for side in (-1, 1):
            polygons.append([(side * shoulder, 0.05), (side * (shoulder + 0.12), 0.14),
                             (side * (shoulder + 0.07), 0.22), (side * (shoulder - 0.02), 0.2)])
    return polygons


def _pants(rng):
    top = rng.uniform(0.16, 0.24)
    bottom = rng.uniform(0.12, 0.2) * (1.4 if rng.random() < 0.3 else 1.0)
    crotch = rng.uniform(0.28, 0.4)
    gap = rng.uniform(0.03, 0.08)
    length = rng.uniform(0.9, 1.0)
    left = [(-top, 0.0), (0.0, 0.0), (0.0, crotch), (-gap, length), (-gap - bottom, length)]
    right = [(x * -1, y) for x, y in left]
    waistband = [(-top, 0.0), (top, 0.0), (top, 0.06), (-top, 0.06)]
    return [left, right, waistband]


def _shoes(rng):
    polygons = []
    heel = rng.uniform(0.0, 0.25)
    length = rng.uniform(0.75, 0.95)
    pair = rng.random() < 0.6
    for offset in ((-0.08, 0.12) if pair else (0.0,)):
        x0, y0 = -length / 2 + offset, 0.6 + offset
        sole = [(x0, y0), (x0 + length, y0), (x0 + length, y0 - 0.05), (x0, y0 - 0.05 - heel)]
        upper = [(x0, y0 - 0.05 - heel), (x0 + 0.02, y0 - 0.35 - heel * 0.5),
                 (x0 + 0.25, y0 - 0.33 - heel * 0.5), (x0 + 0.45, y0 - 0.2),
                 (x0 + length, y0 - 0.12), (x0 + length, y0 - 0.05)]
        polygons += [sole, upper]
        if heel > 0.1:
            polygons.append([(x0, y0 - heel), (x0 + 0.07, y0 - heel), (x0 + 0.05, y0),
                             (x0 + 0.01, y0)])
    return polygons


_SHAPES = {"dress": _dress, "pants": _pants, "shoes": _shoes}


def _garment_mask(kind, rng, size):
    """The silhouette, posed: rotated, scaled and moved within the frame."""
    scale = size * rng.uniform(0.55, 0.85)
    angle = np.deg2rad(rng.uniform(-25, 25))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    mask = np.zeros((size, size), np.uint8)
    for polygon in _SHAPES[kind](rng):
        points = (np.array(polygon) - (0.0, 0.5)) * scale
        points = points * (rng.uniform(0.85, 1.15), 1.0) @ rotation.T + centre
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255, lineType=cv2.LINE_AA)
    return mask


def _garment_colour(name, rng):
    hue, saturation, value = _COLORS[name]
    hue = rng.integers(0, 180) if hue is None else (hue + rng.integers(-7, 8)) % 180
    hsv = np.uint8([[[hue, rng.integers(*saturation), rng.integers(*value)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(rng, size):
    base = rng.uniform(60, 230, size=3)
    image = np.ones((size, size, 3), np.float32) * base
    style = rng.integers(3)
    if style == 0:  # fabric-like texture
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 2)
        image += noise[..., None] * rng.uniform(10, 30)
    elif style == 1:  # stripes or tiles
        period = rng.uniform(6, 20)
        x = np.arange(size)
        stripes = (np.sin(2 * np.pi * x / period)[None, :] > 0).astype(np.float32)
        if rng.random() < 0.5:
            stripes = stripes.T
        image += stripes[..., None] * (rng.uniform(-60, 60, size=3))
    else:  # clutter: other objects, in any colour
        for _ in range(rng.integers(3, 9)):
            colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
            centre = tuple(int(c) for c in rng.integers(0, size, size=2))
            if rng.random() < 0.5:
                cv2.circle(image, centre, int(rng.integers(4, size // 5)), colour, -1)
            else:
                corner = tuple(int(c) for c in rng.integers(0, size, size=2))
                cv2.rectangle(image, centre, corner, colour, -1)
    return image


def _lighting(rng, size):
    """A soft light from a random direction, so the same colour varies in shade across images."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    return 1.0 + rng.uniform(0.1, 0.5) * (np.cos(angle) * x + np.sin(angle) * y)


def _plain_background(rng, size):
    """A grey backdrop, lighter or darker, with a little texture and no colour."""
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 2)
    grey = rng.uniform(70, 220) + noise * rng.uniform(5, 15)
    return np.repeat(grey[..., None], 3, axis=2)


def make_image(class_name, rng, size=IMAGE_SIZE, plain=False):
    """One RGB uint8 image of class_name (colour_kind), on a grey backdrop when plain."""
    colour_name, kind = class_name.split("_")
    background = _plain_background(rng, size) if plain else _background(rng, size)
    mask = _garment_mask(kind, rng, size).astype(np.float32)[..., None] / 255
    colour = _garment_colour(colour_name, rng)
    folds = 1.0 + rng.uniform(0.0, 0.15) * np.sin(
        np.arange(size) / rng.uniform(3, 8) + rng.uniform(0, 6))[None, :, None]
    garment = colour * folds * (0.85 + 0.3 * rng.random())
    image = background * (1 - mask) + garment * mask
    image *= _lighting(rng, size)[..., None]
    image += rng.normal(0, rng.uniform(2, 9), image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    blur = rng.uniform(0, 1.2)
    if blur > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    return image


def generate(folder, per_class, seed=0, size=IMAGE_SIZE, classes=CLASSES, plain=False):
    """Write per_class JPEGs of each class into folder/<class>/; return the files written."""
    written = []
    for class_index, class_name in enumerate(classes):
        os.makedirs(os.path.join(folder, class_name), exist_ok=True)
        for index in range(per_class):
            rng = np.random.default_rng([seed, class_index, index])
            image = make_image(class_name, rng, size, plain)
            path = os.path.join(folder, class_name, f"{class_name}_{index:04d}.jpg")
            quality = int(rng.integers(70, 96))
            cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
            written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write generated photo-like JPEGs, one sub-folder per colour_kind class.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", help="where the class sub-folders are written")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES),
                        help=f"colour_kind names; colours: {', '.join(_COLORS)}; kinds: "
                             f"{', '.join(_SHAPES)}")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--seed", type=int, default=42, help="the same seed, the same images")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    parser.add_argument("--plain", action="store_true",
                        help="grey backdrops instead of coloured, striped or cluttered ones")
    args = parser.parse_args(argv)
    for name in args.classes:
        colour, _, kind = name.partition("_")
        if colour not in _COLORS or kind not in _SHAPES:
            parser.error(f"{name} is not colour_kind with a colour of {', '.join(_COLORS)} "
                         f"and a kind of {', '.join(_SHAPES)}")
    written = generate(args.folder, args.per_class, args.seed, args.size, args.classes,
                       args.plain)
    print(f"wrote {len(written)} images into {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
