"""What train.py leaves in Output/ for predict.py: labels, their metadata, the model, and safe
ways to read them.

labels.pickle is the blog's pickled LabelBinarizer, or a MultiLabelBinarizer for a model
trained with --multi-label. A pickle can run any code when it is loaded, so it is read back
with an unpickler that only admits the classes a binarizer is made of. labels.json says the
same in plain JSON, with what predict needs to preprocess exactly as training did (image
size, colour order) and whether the model is multi-label. Models are loaded in Keras's safe
mode, which refuses to run the Python code a Lambda layer may carry.

Everything a run or an export writes goes through atomic_path, files and folders alike.
"""

import csv
import io
import json
import os
import pathlib
import pickle
import shutil
import uuid
import zipfile
from contextlib import contextmanager

import keras
import numpy as np
from sklearn.preprocessing import LabelBinarizer, MultiLabelBinarizer

from classifier.cli import UserError
from classifier.images import COLOR_ORDER

OUTPUT = "Output"
MODEL_FILE = "vgg_model.keras"  # the blog's network's; others: <network>_model.keras
LABELS_FILE = "labels.pickle"
LABELS_JSON = "labels.json"

_ALLOWED_PICKLE_GLOBALS = {
    ("sklearn.preprocessing._label", "LabelBinarizer"),
    ("sklearn.preprocessing._label", "MultiLabelBinarizer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def add_model_flags(parser):
    """The flags of a script that reads a trained model: --model, --labels, --unsafe-model."""
    parser.add_argument("--model", default=None,
                        help=f"the trained model; none means the one named in {LABELS_JSON} "
                             f"beside --labels ({os.path.join(OUTPUT, MODEL_FILE)} for the "
                             "blog's network)")
    parser.add_argument("--labels", default=os.path.join(OUTPUT, LABELS_FILE),
                        help=f"its labels; {LABELS_JSON} is read from beside it")
    parser.add_argument("--unsafe-model", action="store_true",
                        help="allow models whose Lambda layers carry Python code (only for "
                             "model files you trust: loading them runs that code)")


@contextmanager
def atomic_path(path):
    """Yield a free temporary name beside path, for a file or a folder to be written under;
    when the block completes, what was written takes path's place by renaming, so that an
    interrupted run never leaves a half-written file or folder for a later one to load.
    When the block writes nothing, path stays as it was."""
    folder, name = os.path.split(os.path.abspath(path))
    # The suffix stays: Keras and the exporters choose the format by it (two of them, for
    # Keras's .weights.h5).
    suffix = "".join(pathlib.PurePath(name).suffixes[-2:])
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield temporary
        if os.path.isdir(temporary) and os.path.isdir(path):
            # A folder cannot replace a folder in one rename: move the old one aside first.
            previous = temporary + ".old"
            os.replace(path, previous)
            os.replace(temporary, path)
            shutil.rmtree(previous)
        elif os.path.lexists(temporary):
            os.replace(temporary, path)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.lexists(temporary):
            os.unlink(temporary)


def write_json(path, value):
    """Write value as JSON to path, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)


def write_csv(path, header, rows):
    """Write a header and rows as CSV to path, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def fit_binarizer(labels, multi_label=False):
    """Fit the blog's LabelBinarizer (labels: one class name per image), or with multi_label
    a MultiLabelBinarizer (labels: a tuple of label names per image); return it with the
    targets, one column per class."""
    binarizer = (MultiLabelBinarizer() if multi_label else LabelBinarizer()).fit(labels)
    return binarizer, one_hot(binarizer, labels)


def one_hot(binarizer, labels):
    """One column per class, always: with two classes LabelBinarizer returns a single 0/1
    column, which a two-way softmax cannot be trained against."""
    targets = binarizer.transform(labels)
    if targets.shape[1] == 1 and not is_multi_label(binarizer):
        targets = np.hstack([1 - targets, targets])
    return targets.astype("float32")


def is_multi_label(binarizer):
    return isinstance(binarizer, MultiLabelBinarizer)


def model_file(network):
    return f"{network}_model.keras"


def model_path(model, labels):
    """--model, or where none is given, the model of the run that wrote --labels."""
    if model:
        return model
    info = load_info(labels) or {}
    return os.path.join(os.path.dirname(labels), info.get("model_file", MODEL_FILE))


def save_model(model, output_dir, network):
    """The final model, as the blog saves it, in Keras's own format; returns its path."""
    path = os.path.join(output_dir, model_file(network))
    with atomic_path(path) as temporary:
        model.save(temporary)
    return path


def save_labels(binarizer, output_dir, image_size, network, started_from="none"):
    """labels.pickle and labels.json; started_from: the weights the network started from
    (none, imagenet, a weights file) or the --init-from model."""
    with atomic_path(os.path.join(output_dir, LABELS_FILE)) as temporary:
        with open(temporary, "wb") as handle:
            pickle.dump(binarizer, handle)
    info = {
        "classes": [str(name) for name in binarizer.classes_],
        "image_size": image_size,
        "color_order": COLOR_ORDER,
        "multi_label": is_multi_label(binarizer),
        "network": network,
        "model_file": model_file(network),
        "started_from": started_from,
    }
    write_json(os.path.join(output_dir, LABELS_JSON), info)


class _BinarizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_labels(path):
    """Load a pickled (Multi)LabelBinarizer without running code that the file may carry."""
    if not os.path.isfile(path):
        raise UserError(f"labels file not found: {path} (train a model first: "
                        "python train.py --dataset Dataset)")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        binarizer = _BinarizerUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
        raise UserError(f"{path} is not a labels file this program trusts: {error}") from None
    if not isinstance(binarizer, (LabelBinarizer, MultiLabelBinarizer)):
        raise UserError(f"{path} holds a {type(binarizer).__name__}, not a label binarizer")
    return binarizer


def load_info(labels_path):
    """The labels.json written beside the pickle; None when an older run did not write one."""
    path = os.path.join(os.path.dirname(labels_path), LABELS_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def load_model(path, unsafe=False):
    """A model saved by train.py, loaded in Keras's safe mode unless the user trusts it."""
    if not os.path.isfile(path):
        raise UserError(
            f"no model at {path}: train one first with `python train.py --dataset Dataset`")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        # Keras would say "File not found" of a file that is there but damaged.
        raise UserError(f"{path} is not a model file this program can read (a .keras file "
                        "is a zip archive): it is damaged, or not a model")
    try:
        return keras.models.load_model(path, safe_mode=not unsafe)
    except ValueError as error:
        if "lambda" in str(error).lower():
            raise UserError(
                f"refusing to load {path}: it holds a Lambda layer with Python code, which "
                "would run on loading; pass --unsafe-model if you trust the file") from None
        raise UserError(f"cannot load the model {path}: {error}") from None
    except OSError as error:
        raise UserError(f"cannot load the model {path}: {error}") from None
