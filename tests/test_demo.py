"""The generated demo dataset: deterministic, the blog's classes, colour and shape both needed."""

import hashlib
import os

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

import demo
from classifier import images


def digest(folder):
    sha = hashlib.sha256()
    for path in images.list_images(folder):
        sha.update(open(path, "rb").read())
    return sha.hexdigest()


def test_same_seed_same_images_other_seed_other_images(tmp_path):
    first = demo.generate(str(tmp_path / "a"), per_class=2, seed=5)
    demo.generate(str(tmp_path / "b"), per_class=2, seed=5)
    demo.generate(str(tmp_path / "c"), per_class=2, seed=6)
    assert len(first) == 16
    assert sorted(os.listdir(tmp_path / "a")) == sorted(demo.CLASSES)
    assert digest(str(tmp_path / "a")) == digest(str(tmp_path / "b"))
    assert digest(str(tmp_path / "a")) != digest(str(tmp_path / "c"))


def pair_accuracy(features, labels, pair):
    chosen = np.isin(labels, [demo.CLASSES.index(name) for name in pair])
    classifier = LogisticRegression(max_iter=300)
    return cross_val_score(classifier, features[chosen], labels[chosen], cv=4).mean()


def test_neither_colour_nor_shape_alone_separates_the_classes(tmp_path):
    paths = demo.generate(str(tmp_path), per_class=40, seed=9, size=48)
    pixels = np.stack([images.load_image(path, 24) for path in paths]).astype(np.float32)
    labels = np.repeat(np.arange(len(demo.CLASSES)), 40)
    # Colour alone: how much of each colour the image holds, wherever it is.
    bins = (pixels // 64).astype(int)
    codes = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    colour = np.stack([np.bincount(c.ravel(), minlength=64) for c in codes]) / codes[0].size
    # Shape alone: the picture without its colours.
    shape = pixels.mean(axis=3).reshape(len(paths), -1) / 255
    shape = (shape - shape.mean(axis=1, keepdims=True)) / (shape.std(axis=1, keepdims=True) + 1e-6)
    # Two classes of one colour look alike by colour, two of one garment by shape:
    # near the 0.5 of guessing, where the other cue tells them apart.
    assert pair_accuracy(colour, labels, ("black_dress", "black_pants")) < 0.75
    assert pair_accuracy(colour, labels, ("blue_dress", "blue_pants")) < 0.75
    assert pair_accuracy(shape, labels, ("red_dress", "blue_dress")) < 0.75
    assert pair_accuracy(shape, labels, ("red_dress", "red_shoes")) > 0.75
