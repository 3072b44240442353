"""The reports in Output/ and report.html, which must render from disk in a real browser."""

import json
import os
import re
import shutil
import subprocess

import matplotlib.colors
import numpy as np
import pytest
from sklearn.metrics import ConfusionMatrixDisplay

from classifier import images, reports


def test_every_report_file_is_written(trained_run):
    output = trained_run["output"]
    for name in (reports.REPORT_TEXT, reports.REPORT_JSON, reports.CONFUSION_MATRIX,
                 reports.TRAINING_PLOT, reports.OVERVIEW, reports.MISTAKES, reports.HTML):
        assert os.path.getsize(os.path.join(output, name)) > 0, name


def test_json_report_scores_every_class_on_the_test_split(trained_run):
    output = trained_run["output"]
    scores = json.load(open(os.path.join(output, reports.REPORT_JSON)))
    config = json.load(open(os.path.join(output, "config.json")))
    assert sum(scores[name]["support"] for name in config["classes"]) == config["test_images"]
    # Accuracy is the share of right answers: each class's recall times its support, summed.
    right = sum(scores[name]["recall"] * scores[name]["support"] for name in config["classes"])
    assert scores["accuracy"] == pytest.approx(right / config["test_images"])
    assert {"precision", "recall", "f1-score"} <= set(scores["macro avg"])


def test_html_report_links_only_files_beside_it(trained_run):
    output = trained_run["output"]
    page = open(os.path.join(output, reports.HTML), encoding="utf-8").read()
    targets = re.findall(r'(?:src|href)="([^"]+)"', page)
    for name in (reports.OVERVIEW, reports.TRAINING_PLOT, reports.CONFUSION_MATRIX,
                 reports.MISTAKES, reports.REPORT_JSON, "history.csv", "config.json"):
        assert name in targets
    for target in targets:
        assert os.path.isfile(os.path.join(output, target)), target
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for name in json.load(open(os.path.join(output, "config.json")))["classes"]:
        assert f"<th>{name}</th>" in page


def test_confident_mistakes_come_most_confident_first():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    true = np.array([0, 0, 0, 1, 1])
    assert reports.confident_mistakes(true, probabilities, count=5).tolist() == [1, 4, 2]
    assert reports.confident_mistakes(true, probabilities, count=2).tolist() == [1, 4]


@pytest.mark.skipif(not shutil.which("chromium"),
                    reason="needs Chromium (Debian: apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(trained_run, tmp_path):
    page = os.path.join(os.path.abspath(trained_run["output"]), reports.HTML)
    screenshot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1280,2400",
                    f"--screenshot={screenshot}", f"file://{page}"],
                   check=True, capture_output=True, timeout=120)
    picture = images.decode_image(str(screenshot)).astype(int)
    assert picture.shape[:2] == (2400, 1280)
    # The figures are drawn in colour; a page whose pictures did not load is black on white.
    colourful = (picture.max(axis=2) - picture.min(axis=2)) > 60
    assert colourful.mean() > 0.01


def brightness(colour):
    red, green, blue = matplotlib.colors.to_rgb(colour)
    return 0.299 * red + 0.587 * green + 0.114 * blue


@pytest.mark.parametrize("matrix", [[[1, 1], [1, 1]], [[5, 0], [2, 9]]])
@pytest.mark.parametrize("im_kw", [None, {"vmin": 0}])
def test_every_count_of_the_confusion_matrix_stands_out_from_its_cell(matrix, im_kw):
    # All cells equal: two classes, one image right and one wrong each.
    display = ConfusionMatrixDisplay(np.array(matrix)).plot(colorbar=False, im_kw=im_kw)
    reports.readable_counts(display)
    for text, count in zip(display.text_.flat, display.confusion_matrix.flat):
        cell = display.im_.cmap(display.im_.norm(count))
        assert abs(brightness(text.get_color()) - brightness(cell)) > 0.4, count
