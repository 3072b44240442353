"""Labels: the one-hot targets, the pickle predict.py reads back, and its safety."""

import json
import os
import pickle

import numpy as np
import pytest

from classifier import artifacts
from classifier.cli import UserError


def test_two_classes_get_two_one_hot_columns():
    binarizer, targets = artifacts.fit_binarizer(["cat", "dog", "dog"])
    assert targets.tolist() == [[1, 0], [0, 1], [0, 1]]
    assert list(binarizer.classes_) == ["cat", "dog"]


def test_eight_classes_get_eight_columns():
    names = [f"class{i}" for i in range(8)]
    _, targets = artifacts.fit_binarizer(names * 2)
    assert targets.shape == (16, 8)
    assert (targets.argmax(axis=1) == np.tile(np.arange(8), 2)).all()


def test_labels_round_trip_with_a_json_twin(tmp_path):
    binarizer, _ = artifacts.fit_binarizer(["b", "a", "c"])
    artifacts.save_labels(binarizer, str(tmp_path), image_size=48, network="mobilenet_v3_small",
                          started_from="imagenet")
    loaded = artifacts.load_labels(str(tmp_path / artifacts.LABELS_FILE))
    assert list(loaded.classes_) == ["a", "b", "c"]
    info = json.loads((tmp_path / artifacts.LABELS_JSON).read_text())
    assert info == {"classes": ["a", "b", "c"], "image_size": 48, "color_order": "RGB",
                    "multi_label": False, "network": "mobilenet_v3_small",
                    "model_file": "mobilenet_v3_small_model.keras", "started_from": "imagenet"}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "labels.pickle"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match="refusing to load"):
        artifacts.load_labels(str(path))
    assert not marker.exists()


def test_missing_labels_file_says_to_train_first(tmp_path):
    with pytest.raises(UserError, match="train a model first"):
        artifacts.load_labels(str(tmp_path / "labels.pickle"))


def test_atomic_path_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "report.txt"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(str(target)) as temporary:
            with open(temporary, "w") as handle:
                handle.write("half")
            raise RuntimeError("crash while writing")
    assert os.listdir(tmp_path) == []
