import os
import sys

import cv2
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402
import train  # noqa: E402

TINY_FLAGS = ["--image-size", "32", "--batch-size", "8", "--epochs", "2", "--workers", "2"]


def write_image(path, rgb):
    """Save an RGB uint8 array with OpenCV (which expects BGR)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(np.asarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
    return str(path)


def numbered_images(count):
    """count 8x8 images, image i filled with the value 20 * i, and one-hot targets that say i."""
    x = np.zeros((count, 8, 8, 3), np.uint8)
    for index in range(count):
        x[index] = index * 20
    return x, np.eye(count, dtype="float32")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """Eight demo classes, twelve small images each."""
    folder = tmp_path_factory.mktemp("dataset")
    demo.generate(str(folder), per_class=12, seed=3, size=48)
    return str(folder)


@pytest.fixture(scope="session")
def trained_run(demo_dataset, tmp_path_factory):
    """One real two-epoch training run shared by the tests that inspect its artifacts."""
    work = tmp_path_factory.mktemp("run")
    output, logs = str(work / "Output"), str(work / "logs")
    code = train.main(["--dataset", demo_dataset, "--output", output, "--logs", logs,
                       "--run-name", "tiny", "--checkpoint-every", "1",
                       "--no-checkpoint-best-only", *TINY_FLAGS])
    assert code == 0
    return {"dataset": demo_dataset, "output": output, "logs": logs, "run": "tiny"}
