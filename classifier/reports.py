"""The evaluation on the test split, and the reports and pictures train.py leaves in Output/,
with report.html that links them.

report.html is one self-contained page: the pictures are files beside it, there is no
script, no style sheet and no font from elsewhere, so it opens from disk, with no server
and no network, in any browser.

For a multi-label model, true and predicted are label indicator rows (images x labels, 0/1),
as scikit-learn takes them; for a single-label model, class indices.
"""

import html
import os
from dataclasses import dataclass

import cv2
import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (ConfusionMatrixDisplay, accuracy_score, classification_report,
                             multilabel_confusion_matrix)

from classifier import artifacts, heatmaps

REPORT_TEXT = "classification_report.txt"
REPORT_JSON = "classification_report.json"
CONFUSION_MATRIX = "confusion_matrix.png"
TRAINING_PLOT = "training_plot.png"
OVERVIEW = "dataset_overview.png"
MISTAKES = "confident_mistakes.png"
CALIBRATION_PLOT = "calibration.png"  # these three: confidence_report.py
COVERAGE_PLOT = "coverage.png"
CALIBRATION_JSON = "calibration.json"
HTML = "report.html"
SAMPLES_PER_CLASS = 8
# Test images shown in confident_mistakes.png, and the side of their heat-map overlays.
MISTAKES_SHOWN = 16
HEAT_MAP_SIDE = 192


@dataclass
class Evaluation:
    """The model's answers on the test split: true and predicted (see above), and the
    probabilities they come from."""
    true: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    threshold: float


@dataclass
class RunSummary:
    """What a training run is and did, for report.html and for the programs that run it:
    made from its settings and splits before it trains (of), completed as it goes."""
    output: str
    tensorboard_run: str
    multi_label: bool
    threshold: float
    epochs: int
    classes: list
    training_images: int
    validation_images: int  # None: the test split doubled as validation data
    test_images: int
    image_size: int
    data_mode: str
    precision: str
    tta: bool
    epochs_run: int = 0
    seconds: float = 0.0
    interrupted: int = 0  # the exit code of what stopped training early (130, 143), or 0
    model: str = None
    test_accuracy: float = None  # exact-match accuracy for a multi-label model
    temperature: float = None  # None: not calibrated (no validation part)

    @classmethod
    def of(cls, args, output, tensorboard_run, classes, splits, data_mode, precision):
        return cls(output, tensorboard_run, args.multi_label, args.threshold, args.epochs,
                   classes, len(splits.train.x),
                   len(splits.validation.x) if splits.has_validation else None,
                   len(splits.test.x), args.image_size, data_mode, precision, args.tta)

    def facts(self):
        """The table at the top of report.html."""
        return {
            ("test exact-match accuracy" if self.multi_label else "test accuracy"):
                f"{self.test_accuracy:.4f}",
            "labels": (f"several per image (threshold {self.threshold})" if self.multi_label
                       else "one per image"),
            "epochs": f"{self.epochs_run} of {self.epochs}",
            "classes": len(self.classes), "training images": self.training_images,
            "validation images": self.validation_images or "the test split",
            "test images": self.test_images, "image size": f"{self.image_size}x{self.image_size}",
            "precision": self.precision,
            "calibration": (f"temperature {self.temperature:.3f}" if self.temperature
                            else "none: no validation part"),
            "test-time augmentation": ("on: each image and its mirror image, probabilities "
                                       "averaged" if self.tta else "off"),
            "training time": f"{self.seconds:.0f} s",
            "TensorBoard run": self.tensorboard_run}


def evaluate(probabilities, test_y, multi_label, threshold):
    """The evaluation of the model's probabilities on the test split, whose targets are
    test_y."""
    if multi_label:  # label indicator rows: what scikit-learn takes as multi-label
        return Evaluation(test_y.astype(int), (probabilities >= threshold).astype(int),
                          probabilities, threshold)
    return Evaluation(test_y.argmax(axis=1), probabilities.argmax(axis=1), probabilities,
                      threshold)


def accuracy(evaluation, positions):
    """The (exact-match) accuracy of evaluation on the test images at positions."""
    return float(accuracy_score(evaluation.true[positions], evaluation.predicted[positions]))


def save_test_reports(evaluation, test_x, classes, output, model):
    """The classification report, the confusion matrix and the most confident mistakes with
    where model looked; returns the report's text and scores, and the test accuracy
    (exact-match for a multi-label model)."""
    true, predicted = evaluation.true, evaluation.predicted
    text, scores = save_classification_report(true, predicted, classes, output)
    save_confusion_matrix(true, predicted, classes, output)
    wrong = confident_mistakes(true, evaluation.probabilities, MISTAKES_SHOWN,
                               evaluation.threshold)
    pictures = test_x[wrong]
    maps = (heatmaps.grad_cam(model, pictures, evaluation.probabilities[wrong].argmax(axis=1))
            if len(wrong) else [])
    save_confident_mistakes(pictures, true[wrong], evaluation.probabilities[wrong], classes,
                            output, evaluation.threshold, maps)
    accuracy = scores["exact_match_accuracy"] if _indicator_rows(true) else scores["accuracy"]
    return text, scores, accuracy


def save_figure(figure, path):
    """Figures are made with layout="constrained", which, unlike tight_layout, leaves room
    for a figure's title above its rows of titled pictures."""
    with artifacts.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def _indicator_rows(true):
    """Whether true holds a row of 0/1 per image (multi-label), not a class index."""
    return np.ndim(true) == 2


def save_classification_report(true, predicted, classes, output):
    """scikit-learn's report as text (the blog's) and as JSON; returns both. Multi-label
    reports add the exact-match accuracy: the share of images with every label right."""
    options = {"labels": range(len(classes)), "target_names": classes, "zero_division": 0}
    text = classification_report(true, predicted, digits=4, **options)
    scores = classification_report(true, predicted, output_dict=True, **options)
    if _indicator_rows(true):
        exact = scores["exact_match_accuracy"] = float(accuracy_score(true, predicted))
        text += f"\nexact-match accuracy (every label right): {exact:.4f}\n"
    with artifacts.atomic_path(os.path.join(output, REPORT_TEXT)) as temporary:
        with open(temporary, "w") as handle:
            handle.write(text)
    artifacts.write_json(os.path.join(output, REPORT_JSON), scores)
    return text, scores


def save_confusion_matrix(true, predicted, classes, output):
    """The blog's confusion matrix; for multi-label, one yes/no matrix per label."""
    if _indicator_rows(true):
        save_label_matrices(true, predicted, classes, output)
        return
    figure, axes = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2),
                                layout="constrained")
    readable_counts(ConfusionMatrixDisplay.from_predictions(
        true, predicted, labels=range(len(classes)), display_labels=classes,
        xticks_rotation=45, colorbar=False, ax=axes, im_kw={"vmin": 0}))
    axes.set_title("Confusion matrix (test split)")
    save_figure(figure, os.path.join(output, CONFUSION_MATRIX))


def readable_counts(display):
    """Each count in black or white by the brightness of its own cell. scikit-learn picks
    the colour against the middle of the counts, so when every cell holds the same count,
    numbers and cells come out in one colour."""
    for text, count in zip(display.text_.flat, display.confusion_matrix.flat):
        red, green, blue, _ = display.im_.cmap(display.im_.norm(count))
        text.set_color("black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white")


def save_label_matrices(true, predicted, classes, output):
    columns = min(4, len(classes))
    rows = -(-len(classes) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 3, rows * 3), squeeze=False,
                                layout="constrained")
    for axes in grid.flat:
        axes.axis("off")
    for axes, name, matrix in zip(grid.flat, classes,
                                  multilabel_confusion_matrix(true, predicted)):
        axes.axis("on")
        readable_counts(ConfusionMatrixDisplay(matrix, display_labels=["no", "yes"]).plot(
            ax=axes, colorbar=False, im_kw={"vmin": 0}))
        axes.set_title(name)
    figure.suptitle("Confusion matrix per label (test split)")
    save_figure(figure, os.path.join(output, CONFUSION_MATRIX))


def save_training_plot(history, output):
    """Loss and accuracy per epoch, for the epochs that actually ran (the share of right
    yes/no label decisions, binary_accuracy, for multi-label models)."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    accuracy = "accuracy" if "accuracy" in history else "binary_accuracy"
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(12, 4.5),
                                                      layout="constrained")
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, accuracy)):
        axes.plot(epochs, history[metric], label=f"train {metric}")
        axes.plot(epochs, history[f"val_{metric}"], label=f"validation {metric}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle("Training loss and accuracy")
    save_figure(figure, os.path.join(output, TRAINING_PLOT))


def save_overview(classes, train, test, validation, output):
    """The dataset overview of the splits (each with x, images, and y, one column per
    class; validation None when the test split doubles as validation data): images per
    class (per label when multi-label) in each split, and a few training images of each."""
    counts = {"training": train.y.sum(axis=0), "test": test.y.sum(axis=0)}
    if validation is not None:
        counts["validation"] = validation.y.sum(axis=0)
    samples = {index: train.x[np.flatnonzero(train.y[:, index])[:SAMPLES_PER_CLASS]]
               for index in range(len(classes))}
    save_dataset_overview(counts, samples, classes, output)


def save_dataset_overview(counts, samples, classes, output):
    """The blog's quick look at the data: images per class and split, then a row of sample
    images per class. counts: {split name: array of images per class}; samples: {class
    index: list of uint8 RGB images}."""
    columns, side = SAMPLES_PER_CLASS, 1.3  # inches per picture
    # Rows as tall as the pictures are wide, plus their title: pictures fill their cells.
    figure = plt.figure(figsize=(columns * side, 3 + (side + 0.25) * len(classes)),
                        layout="constrained")
    figure.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    grid = figure.add_gridspec(len(classes) + 1, columns,
                               height_ratios=[3] + [side + 0.25] * len(classes))
    bars = figure.add_subplot(grid[0, :])
    positions = np.arange(len(classes))
    width = 0.8 / len(counts)
    for offset, (split, per_class) in enumerate(counts.items()):
        bars.bar(positions + offset * width, per_class, width, label=split)
    bars.set_xticks(positions + width * (len(counts) - 1) / 2, classes, rotation=30,
                    ha="right")
    bars.set_ylabel("images")
    bars.set_title("Images per class")
    bars.margins(y=0.3)  # room above the bars for the legend
    bars.legend(loc="upper right", ncols=len(counts))
    for row, name in enumerate(classes, start=1):
        for column in range(columns):
            axes = figure.add_subplot(grid[row, column])
            axes.axis("off")
            if column < len(samples.get(row - 1, [])):
                axes.imshow(samples[row - 1][column])
            if column == 0:
                axes.set_title(name, fontsize=9, loc="left")
    save_figure(figure, os.path.join(output, OVERVIEW))


def confident_mistakes(true, probabilities, count, threshold=0.5):
    """Indices of the wrongly predicted images, the most confident mistakes first. A
    multi-label image is wrong when any label is; its mistake is as confident as the
    probability of its worst label is far from the truth."""
    if _indicator_rows(true):
        wrong = np.flatnonzero(np.any((probabilities >= threshold) != true, axis=1))
        confidence = np.abs(probabilities[wrong] - true[wrong]).max(axis=1)
    else:
        predicted = probabilities.argmax(axis=1)
        wrong = np.flatnonzero(predicted != true)
        confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def mistake_title(truth, probability, classes, threshold):
    """'true: ...\npredicted: ...' under a picture of a mistake."""
    if np.ndim(truth) == 0:
        guess = int(np.argmax(probability))
        return (f"true: {classes[truth]}\npredicted: {classes[guess]} "
                f"{probability[guess] * 100:.1f}%")
    true_names = ", ".join(classes[index] for index in np.flatnonzero(truth)) or "none"
    guessed = ", ".join(f"{classes[index]} {probability[index] * 100:.0f}%"
                        for index in np.flatnonzero(probability >= threshold)) or "none"
    return f"true: {true_names}\npredicted: {guessed}"


def save_confident_mistakes(pictures, true, probabilities, classes, output, threshold=0.5,
                            heat_maps=()):
    """A grid of the given test images with their true and predicted classes, each above
    its heat map (heatmaps.py) where heat_maps are given: where the model looked for the
    class it wrongly chose."""
    columns = 4
    rows = max(1, -(-len(pictures) // columns))
    per_picture = 2 if len(heat_maps) else 1
    figure, grid = plt.subplots(rows * per_picture, columns,
                                figsize=(columns * 2.6, rows * (3.1 + 2.3 * (per_picture - 1))
                                         + 0.5), squeeze=False, layout="constrained")
    for axes in grid.flat:
        axes.axis("off")
    for index, (picture, truth, probability) in enumerate(zip(pictures, true, probabilities)):
        row, column = divmod(index, columns)
        axes = grid[row * per_picture, column]
        axes.imshow(picture)
        axes.set_title(mistake_title(truth, probability, classes, threshold), fontsize=9)
        if len(heat_maps):
            # Drawn larger than the model's input, so that the colours blend smoothly.
            side = max(picture.shape[0], HEAT_MAP_SIDE)
            grid[row * 2 + 1, column].imshow(heatmaps.overlay(
                cv2.resize(picture, (side, side), interpolation=cv2.INTER_NEAREST),
                heat_maps[index]))
    if not len(pictures):
        grid[0, 0].text(0, 0.5, "No mistakes on the test split.", fontsize=12)
    figure.suptitle("The most confident mistakes on the test split")
    save_figure(figure, os.path.join(output, MISTAKES))


def write_html(output, summary, report, trust=(), data="", search=""):
    """report.html: the run's figures, pictures and per-class scores on one page; trust: the
    lines of confidence_report about the calibration and --min-confidence; data: the "Your
    data" section (data_report.section); search: the --tune section (tuning_report)."""
    def link(name):
        return f'<a href="{html.escape(name)}">{html.escape(name)}</a>'

    def picture(name, title):
        if not os.path.exists(os.path.join(output, name)):
            return ""
        return (f"<h2>{html.escape(title)}</h2>\n"
                f'<p><img src="{html.escape(name)}" alt="{html.escape(title)}"></p>')

    facts = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
                    for key, value in summary.items())
    rows = []
    for name, scores in report.items():
        if isinstance(scores, dict):
            rows.append(f"<tr><th>{html.escape(name)}</th>" + "".join(
                f"<td>{scores[key]:.4g}</td>" for key in
                ("precision", "recall", "f1-score", "support")) + "</tr>")
    if "exact_match_accuracy" in report:
        accuracy_row = ('<tr><th>exact-match accuracy</th><td colspan="4">'
                        f'{report["exact_match_accuracy"]:.4f}</td></tr>')
    else:
        accuracy_row = (f'<tr><th>accuracy</th><td colspan="4">{report.get("accuracy", 0):.4f}'
                        '</td></tr>')
    files = [name for name in (REPORT_TEXT, REPORT_JSON, "history.csv", "config.json",
                               "labels.json", CALIBRATION_JSON, "skipped_files.csv",
                               "split.csv", "data_check.json", "duplicates.csv",
                               "label_issues.csv", "tuning.csv", artifacts.MODEL_FILE)
             if os.path.exists(os.path.join(output, name))]
    body = f"""<h1>Training report</h1>
<table>{facts}</table>
{picture(OVERVIEW, "The dataset")}
{data}
{search or ""}
{picture(TRAINING_PLOT, "Loss and accuracy per epoch")}
<h2>Scores per class (test split)</h2>
<table><tr><th></th><th>precision</th><th>recall</th><th>f1-score</th><th>support</th></tr>
{"".join(rows)}
{accuracy_row}</table>
{picture(CONFUSION_MATRIX, "Confusion matrix (test split)")}
{picture(MISTAKES, "The most confident mistakes")}
<h2>How far to trust its confidence</h2>
{"".join(f"<p>{html.escape(line)}</p>" for line in trust)}
{picture(CALIBRATION_PLOT, "Reliability: accuracy against confidence (test split)")}
{picture(COVERAGE_PLOT, "Accuracy against the share answered, for --min-confidence")}
<h2>Files</h2>
<ul>{"".join(f"<li>{link(name)}</li>" for name in files)}</ul>"""
    write_page(os.path.join(output, HTML), "Training report", body)


def write_page(path, title, body):
    """A self-contained HTML page (see the top of this file) of body under title."""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(page)
