"""Multi-label training: labels from folder names or a CSV file, sigmoid outputs, per-label
reports, and predict.py reporting every label above its threshold."""

import csv
import json
import os
import pickle

import numpy as np
import pytest

import demo
import predict
import train
from classifier import artifacts, dataset, images, reports, run_folder
from conftest import TINY_FLAGS

LABELS = ["black", "blue", "dress", "green", "pants", "red", "shoes", "white"]


@pytest.fixture(scope="session")
def multi_label_run(demo_dataset, tmp_path_factory):
    """One real two-epoch multi-label run on the demo classes (colour_kind folders)."""
    work = tmp_path_factory.mktemp("multi")
    output = str(work / "Output")
    code = train.main(["--dataset", demo_dataset, "--output", output, "--logs",
                       str(work / "logs"), "--multi-label", *TINY_FLAGS])
    assert code == 0
    return {"dataset": demo_dataset, "output": output}


def model_probabilities(run, path):
    model = artifacts.load_model(os.path.join(run["output"], artifacts.MODEL_FILE))
    pixels = images.load_image(path, model.input_shape[1])[None].astype("float32")
    return model.predict(pixels, verbose=0)[0]


@pytest.mark.slow
def test_folder_names_are_split_into_labels(multi_label_run):
    output = multi_label_run["output"]
    binarizer = artifacts.load_labels(os.path.join(output, artifacts.LABELS_FILE))
    assert artifacts.is_multi_label(binarizer)
    assert list(binarizer.classes_) == LABELS
    info = json.load(open(os.path.join(output, artifacts.LABELS_JSON)))
    assert info["multi_label"] is True and info["classes"] == LABELS


@pytest.mark.slow
def test_outputs_are_independent_sigmoids_trained_with_binary_cross_entropy(multi_label_run):
    model = artifacts.load_model(os.path.join(multi_label_run["output"], artifacts.MODEL_FILE))
    assert model.get_layer("probabilities").get_config()["activation"] == "sigmoid"
    assert model.loss == "binary_crossentropy"
    history = run_folder.read_history(multi_label_run["output"])
    assert len(history["binary_accuracy"]) == 2 and "val_binary_accuracy" in history


@pytest.mark.slow
def test_report_scores_each_label_and_the_exact_match_accuracy(multi_label_run):
    output = multi_label_run["output"]
    scores = json.load(open(os.path.join(output, reports.REPORT_JSON)))
    config = json.load(open(os.path.join(output, "config.json")))
    # Every test image has one colour and one kind: two labels each.
    assert sum(scores[name]["support"] for name in LABELS) == 2 * config["test_images"]
    # The share of test images with every label right: a whole number of images.
    right = scores["exact_match_accuracy"] * config["test_images"]
    assert right == pytest.approx(round(right))
    text = open(os.path.join(output, reports.REPORT_TEXT)).read()
    assert (f"exact-match accuracy (every label right): {scores['exact_match_accuracy']:.4f}"
            in text)
    page = open(os.path.join(output, reports.HTML)).read()
    assert "exact-match accuracy" in page
    for name in (reports.CONFUSION_MATRIX, reports.MISTAKES, reports.OVERVIEW):
        assert os.path.getsize(os.path.join(output, name)) > 0


@pytest.mark.slow
def test_predict_reports_every_label_at_or_above_the_threshold(multi_label_run, capsys,
                                                                tmp_path):
    run = multi_label_run
    image = os.path.join(run["dataset"], "blue_pants", "blue_pants_0001.jpg")
    probabilities = model_probabilities(run, image)
    # A threshold between the second and third most probable labels: exactly two reported.
    ranked = np.sort(probabilities)[::-1]
    threshold = float((ranked[1] + ranked[2]) / 2)
    code = predict.main(["--image", image, "--model",
                         os.path.join(run["output"], artifacts.MODEL_FILE), "--labels",
                         os.path.join(run["output"], artifacts.LABELS_FILE), "--output",
                         str(tmp_path), "--format", "json", "--threshold", str(threshold)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)[0]
    expected = [LABELS[index] for index in np.argsort(probabilities)[::-1][:2]]
    assert [entry["label"] for entry in result["predictions"]] == expected
    for entry in result["predictions"]:
        assert abs(entry["probability"] - probabilities[LABELS.index(entry["label"])]) < 1e-5
    assert os.path.exists(tmp_path / "blue_pants_0001.jpg")


@pytest.mark.slow
def test_predict_says_no_label_when_none_reaches_the_threshold(multi_label_run, capsys,
                                                               tmp_path):
    run = multi_label_run
    image = os.path.join(run["dataset"], "red_shoes", "red_shoes_0002.jpg")
    threshold = min(0.999, float(model_probabilities(run, image).max()) + 1e-4)
    code = predict.main(["--image", image, "--model",
                         os.path.join(run["output"], artifacts.MODEL_FILE), "--labels",
                         os.path.join(run["output"], artifacts.LABELS_FILE), "--output",
                         str(tmp_path), "--threshold", str(threshold)])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"{image}: no label"


def test_each_label_gets_its_own_line_on_the_annotated_image():
    image = np.full((100, 100, 3), 255, np.uint8)
    one, three = predict.annotate(image, ["blue 99.00%"]), predict.annotate(
        image, ["blue 99.00%", "shoes 98.00%", "red 51.00%"])
    # The black band behind the text grows with the labels; its right end holds no text.
    assert (one[50, -1] == 255).all() and (three[50, -1] == 0).all()
    assert three[95:].min() == 255


def write_flat_images(folder, names):
    """Demo images of the given classes, in one folder without class sub-folders."""
    written = demo.generate(str(folder), per_class=6, seed=5, size=40, classes=names)
    flat = folder / "all"
    flat.mkdir()
    rows = []
    for path in written:
        target = flat / os.path.basename(path)
        os.replace(path, target)
        rows.append((os.path.join("all", target.name),
                     ";".join(os.path.basename(os.path.dirname(path)).split("_"))))
    return rows


@pytest.mark.slow
def test_labels_come_from_a_csv_file(tmp_path):
    dataset = tmp_path / "data"
    rows = write_flat_images(dataset, ["red_dress", "blue_shoes", "green_pants"])
    rows.append(("all/gone.jpg", "red;dress"))
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "labels"), *rows])
    output = tmp_path / "Output"
    code = train.main(["--dataset", str(dataset), "--labels-csv", str(labels_csv),
                       "--output", str(output), "--logs", str(tmp_path / "logs"),
                       *TINY_FLAGS, "--epochs", "1"])
    assert code == 0
    with open(output / artifacts.LABELS_FILE, "rb") as handle:
        assert list(pickle.load(handle).classes_) == ["blue", "dress", "green", "pants", "red",
                                                      "shoes"]
    skipped = list(csv.DictReader(open(output / "skipped_files.csv")))
    assert [row["path"] for row in skipped] == [str(dataset / "all" / "gone.jpg")]
    assert "not found" in skipped[0]["reason"]


def test_a_malformed_labels_csv_is_one_clear_error(tmp_path, caplog):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("a.jpg,red;dress,extra\n")
    code = train.main(["--dataset", str(tmp_path), "--labels-csv", str(labels_csv),
                       "--output", str(tmp_path / "Output"), "--logs", str(tmp_path / "logs")])
    assert code == 2
    assert "line 1: expected 2 columns (path,labels), found 3" in caplog.text


def test_labels_csv_rows_and_folder_names_split_into_sorted_label_tuples(tmp_path):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,labels\nx/a.jpg, red ; dress \nb.png,\n")
    rows = dataset.read_labels_csv(str(labels_csv), "/data", ";")
    assert rows == {"/data/x/a.jpg": ("dress", "red"), "/data/b.png": ()}
    assert dataset.split_label("black_dress", "_") == ("black", "dress")
    assert dataset.split_label("t-shirt", "_") == ("t-shirt",)


def test_class_weights_are_refused_with_multi_label(tmp_path, caplog):
    code = train.main(["--dataset", str(tmp_path), "--multi-label", "--class-weight",
                       "balanced", "--output", str(tmp_path / "Output")])
    assert code == 2 and "--class-weight" in caplog.text


def test_a_multi_label_mistake_is_any_wrong_label_the_worst_label_first():
    true = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]])
    probabilities = np.array([[0.9, 0.1, 0.8],   # right
                              [0.9, 0.7, 0.8],   # one extra label at 0.7
                              [0.1, 0.9, 0.6],   # one extra label at 0.6
                              [0.05, 0.9, 0.1]])  # a missed label at 0.05: the worst
    assert list(reports.confident_mistakes(true, probabilities, 10)) == [3, 1, 2]
    assert list(reports.confident_mistakes(true, probabilities, 10, threshold=0.65)) == [3, 1]
