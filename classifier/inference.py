"""How a trained model labels a batch of images, the same in the test report and in
predict.py: its probabilities, or with test-time augmentation (--tta) the mean of those of
the images and of their mirror images."""

import numpy as np


def probabilities(model, images, tta=False):
    """One row of probabilities per image of images, a float32 batch as images.load_image
    gives them (N x size x size x 3)."""
    found = np.asarray(model.predict_on_batch(images))
    if tta:
        found = (found + np.asarray(model.predict_on_batch(images[:, :, ::-1]))) / 2
    return found


def add_tta_flag(parser):
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: each image's probabilities averaged "
                             "with its mirror image's")
