"""Calibrated probabilities: temperature scaling fitted on the validation part, kept inside the
model, and the measures the report gives (expected calibration error, coverage, a suggested
--min-confidence)."""

import csv
import io
import json
import os

import keras
import numpy as np
import pytest

import predict
import train
from classifier import artifacts, calibration, reports
from conftest import TINY_FLAGS

CLASSES = 4


def overconfident_logits(count, seed, multi_label=False):
    """Logits of a model that is right about 70% of the time and about 99% sure every time,
    and the targets, one column per class."""
    rng = np.random.default_rng(seed)
    if multi_label:
        truth = rng.random((count, CLASSES)) < 0.4
        said = np.where(rng.random((count, CLASSES)) < 0.8, truth, ~truth)
        return np.where(said, 6.0, -6.0) + rng.normal(0, 1, (count, CLASSES)), truth * 1.0
    true = rng.integers(CLASSES, size=count)
    right = rng.random(count) < 0.7
    said = np.where(right, true, (true + rng.integers(1, CLASSES, size=count)) % CLASSES)
    logits = rng.normal(0, 1, (count, CLASSES))
    logits[np.arange(count), said] += 8
    return logits, np.eye(CLASSES)[true]


def error(logits, targets, multi_label, temperature):
    found = calibration.probabilities(logits, multi_label, temperature)
    truth = targets if multi_label else targets.argmax(axis=1)
    return calibration.reliability(found, truth, multi_label)[1]


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_temperature_fitted_on_validation_lowers_the_error_on_other_images(multi_label):
    validation = overconfident_logits(400, seed=1, multi_label=multi_label)
    test = overconfident_logits(400, seed=2, multi_label=multi_label)
    temperature = calibration.fit_temperature(*validation, multi_label)
    assert temperature > 1.5  # over-confident: softened
    before, after = (error(*test, multi_label, t) for t in (1.0, temperature))
    assert before > 0.15 and after < before / 3


def test_a_validation_part_answered_all_right_is_said_to_be_too_easy_to_calibrate(caplog):
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    assert calibration.fit_temperature(logits, np.eye(2)[[0, 1, 0]], False) == 1.0
    assert "answers all 3 validation images right: nothing to calibrate on" in caplog.text


def small_model(multi_label=False):
    inputs = keras.Input((5,))
    logits = keras.layers.Dense(CLASSES, name="logits")(inputs)
    outputs = keras.layers.Activation("sigmoid" if multi_label else "softmax", dtype="float32",
                                      name="probabilities")(logits)
    model = keras.Model(inputs, outputs)
    model.get_layer("logits").set_weights([np.random.default_rng(0).normal(0, 4, (5, CLASSES)),
                                           np.zeros(CLASSES)])
    return model


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_temperature_lives_in_the_model_and_survives_saving(multi_label, tmp_path):
    model = small_model(multi_label)
    x = np.random.default_rng(1).normal(size=(16, 5)).astype("float32")
    logits = calibration.logits_model(model).predict(x, verbose=0)
    calibrated = calibration.with_temperature(model, 2.5, multi_label)
    path = str(tmp_path / "calibrated.keras")
    calibrated.save(path)
    loaded = artifacts.load_model(path)  # safe mode: no Python code in the model
    assert calibration.temperature_of(loaded) == pytest.approx(2.5)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               calibration.probabilities(logits, multi_label, 2.5), atol=1e-6)
    # Softer, never another answer.
    np.testing.assert_array_equal(loaded.predict(x, verbose=0).argmax(axis=1),
                                  model.predict(x, verbose=0).argmax(axis=1))
    plain = calibration.with_temperature(loaded, None, multi_label)
    assert calibration.temperature_of(plain) == 1.0
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


def test_the_error_is_zero_when_confidence_is_accuracy_and_one_when_sure_and_wrong():
    # Two classes, 0.75 sure each time, right three times in four.
    found = np.array([[0.75, 0.25]] * 4)
    assert calibration.reliability(found, np.array([0, 0, 0, 1]), False)[1] == \
        pytest.approx(0)
    rows, wrong = calibration.reliability(np.array([[1.0, 0.0]] * 3), np.array([1, 1, 1]),
                                          False)
    assert wrong == pytest.approx(1) and rows[-1] == (1.0, 0.0, 3)


def test_the_suggested_min_confidence_is_the_lowest_that_reaches_the_target():
    # Sure 0.9 and right, 0.8 right, 0.7 wrong, 0.6 right: only 0.71 and above are all right.
    found = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    true = np.array([0, 0, 0, 0])
    assert calibration.suggest_min_confidence(found, true, False) == (0.71, 0.5, 1.0)
    curve = calibration.coverage_curve(found, true, False)
    np.testing.assert_allclose(curve[0], [0.6, 0.7, 0.8, 0.9])
    np.testing.assert_allclose(curve[1], [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(curve[2], [0.75, 2 / 3, 1.0, 1.0])
    assert calibration.suggest_min_confidence(found, np.array([1, 1, 0, 1]), False) is None


def test_a_multi_label_answer_is_as_sure_as_its_least_sure_label():
    found = np.array([[0.95, 0.1, 0.3]])
    assert calibration.confidence(found, True) == pytest.approx([0.7])


def predicted_csv(output, images_folder, capsys):
    code = predict.main(["--image", images_folder, "--labels",
                         os.path.join(output, artifacts.LABELS_FILE), "--format", "csv",
                         "--no-annotate", "--batch-size", "5"])
    assert code == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


@pytest.mark.slow
def test_a_run_with_a_validation_part_reports_what_predict_then_says(demo_dataset, tmp_path,
                                                                     capsys):
    """The test report's calibration error and accuracy, recomputed from predict.py's
    numbers on the same test images, come out the same: one path, calibrated throughout."""
    output = str(tmp_path / "Output")
    test_dir = os.path.join(str(tmp_path), "test")
    os.symlink(demo_dataset, test_dir)
    assert train.main(["--dataset", demo_dataset, "--val-dir", demo_dataset, "--test-dir",
                       test_dir, "--output", output, "--logs", str(tmp_path / "logs"),
                       *TINY_FLAGS]) == 0
    with open(os.path.join(output, reports.CALIBRATION_JSON)) as handle:
        figures = json.load(handle)
    assert figures["temperature"] > 0 and figures["ece_after"] != figures["ece_before"]
    model = artifacts.load_model(os.path.join(output, artifacts.MODEL_FILE))
    assert calibration.temperature_of(model) == pytest.approx(figures["temperature"])

    capsys.readouterr()
    rows = predicted_csv(output, test_dir, capsys)
    classes = artifacts.load_info(os.path.join(output, artifacts.LABELS_FILE))["classes"]
    # predict.py gives the top class; the error is the top class's (the rest of each
    # distribution, spread evenly, stays below it).
    top = np.array([float(row["probability"]) for row in rows])
    said = np.array([classes.index(row["label"]) for row in rows])
    true = np.array([classes.index(os.path.basename(os.path.dirname(row["path"])))
                     for row in rows])
    found = np.repeat(((1 - top) / (len(classes) - 1))[:, None], len(classes), axis=1)
    found[np.arange(len(rows)), said] = top
    assert calibration.reliability(found, true, False)[1] == pytest.approx(
        figures["ece_after"], abs=1e-5)
    with open(os.path.join(output, reports.REPORT_JSON)) as handle:
        assert json.load(handle)["accuracy"] == pytest.approx((said == true).mean())
    page = open(os.path.join(output, reports.HTML), encoding="utf-8").read()
    assert f"temperature {figures['temperature']:.3f}" in page
    for picture in (reports.CALIBRATION_PLOT, reports.COVERAGE_PLOT):
        assert os.path.getsize(os.path.join(output, picture)) > 0 and picture in page


def test_a_run_without_a_validation_part_says_it_could_not_calibrate(trained_run):
    """The blog's split: the test part doubles as validation data, so nothing is left to
    fit a temperature on."""
    output = trained_run["output"]
    with open(os.path.join(output, reports.CALIBRATION_JSON)) as handle:
        assert json.load(handle)["temperature"] is None
    model = artifacts.load_model(os.path.join(output, artifacts.MODEL_FILE))
    assert calibration.temperature_of(model) == 1.0
    page = open(os.path.join(output, reports.HTML), encoding="utf-8").read()
    assert "Not calibrated: this run had no validation part" in page
