"""How far the test report lets a user trust the model's confidence: the calibration before
and after temperature scaling (calibration.png, a reliability diagram), and what answering
"I don't know" below a confidence costs and gains (coverage.png); the figures in
calibration.json for scripts, and as lines for report.html.

Everything is measured on the test part, which the temperature never saw.
"""

import os

import matplotlib.pyplot as plt
import numpy as np

from classifier import artifacts, calibration, reports


def save(before, after, temperature, validation_images, output):
    """The pictures and calibration.json from the test part's evaluations before and after
    calibration (after None: the run had no validation part to calibrate on); returns the
    report's lines about them."""
    multi_label = np.ndim(before.true) == 2
    rows_before, error_before = calibration.reliability(before.probabilities, before.true,
                                                        multi_label)
    final = after or before
    figures = {"temperature": temperature, "validation_images": validation_images,
               "bins": calibration.BINS, "ece_before": error_before}
    diagrams = [("before calibration", rows_before, error_before)]
    if after:
        rows_after, figures["ece_after"] = calibration.reliability(
            after.probabilities, after.true, multi_label)
        diagrams.append((f"after (temperature {temperature:.2f})", rows_after,
                         figures["ece_after"]))
    save_reliability_diagrams(diagrams, multi_label, os.path.join(output, reports.CALIBRATION_PLOT))

    suggestion = calibration.suggest_min_confidence(final.probabilities, final.true,
                                                    multi_label, final.threshold)
    figures["target_accuracy"] = calibration.TARGET_ACCURACY
    figures["suggested_min_confidence"] = suggestion and suggestion[0]
    figures["coverage_at_suggestion"] = suggestion and suggestion[1]
    figures["accuracy_at_suggestion"] = suggestion and suggestion[2]
    save_coverage_plot(calibration.coverage_curve(final.probabilities, final.true,
                                                  multi_label, final.threshold),
                       suggestion, os.path.join(output, reports.COVERAGE_PLOT))
    artifacts.write_json(os.path.join(output, reports.CALIBRATION_JSON), figures)
    return lines(figures)


def lines(figures):
    """What report.html says of the figures calibration.json holds."""
    if figures["temperature"] is None:
        said = [f"Not calibrated: this run had no validation part (--val-dir or --val-size), "
                f"and the test part must not be used for it. Expected calibration error on "
                f"the test part: {figures['ece_before']:.4f}."]
    else:
        said = [f"Calibrated by temperature scaling: temperature {figures['temperature']:.3f}, "
                f"fitted on {figures['validation_images']} validation images. Expected "
                f"calibration error on the test part ({figures['bins']} bins): "
                f"{figures['ece_before']:.4f} before, {figures['ece_after']:.4f} after."]
    target = f"{figures['target_accuracy'] * 100:.0f}%"
    if figures["suggested_min_confidence"] is None:
        said.append(f"No --min-confidence makes the answered test images {target} accurate.")
    else:
        said.append(
            f"predict.py --min-confidence {figures['suggested_min_confidence']:.2f} answers "
            f"{figures['coverage_at_suggestion'] * 100:.1f}% of the test images, "
            f"{figures['accuracy_at_suggestion'] * 100:.1f}% of them correctly (aiming at "
            f"{target}); the others get 'unknown'.")
    return said


def save_reliability_diagrams(diagrams, multi_label, path):
    """One reliability diagram per (title, reliability rows, error): accuracy against
    confidence per bin; a calibrated model's bars reach the diagonal."""
    figure, grid = plt.subplots(1, len(diagrams), figsize=(5 * len(diagrams), 5), squeeze=False,
                                layout="constrained")
    width = 1 / calibration.BINS
    for axes, (title, rows, error) in zip(grid.flat, diagrams):
        lefts = np.arange(calibration.BINS) * width
        accuracy = [row[1] or 0 for row in rows]
        confidence = [row[0] or 0 for row in rows]
        axes.bar(lefts, accuracy, width, align="edge", edgecolor="black", label="accuracy")
        axes.bar(lefts, np.subtract(confidence, accuracy), width, bottom=accuracy,
                 align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
        axes.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
        axes.set_xlim(0.5 if multi_label else 0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence" + (" of each yes/no decision" if multi_label else ""))
        axes.set_ylabel("accuracy")
        axes.set_title(f"{title}\nexpected calibration error {error:.4f}")
        axes.legend(loc="upper left")
    figure.suptitle("Reliability on the test part")
    reports.save_figure(figure, path)


def save_coverage_plot(curve, suggestion, path):
    """Accuracy on the answered images against the share answered, as --min-confidence
    rises; the suggested value marked."""
    thresholds, coverage, accuracy = curve
    figure, axes = plt.subplots(figsize=(6.5, 5), layout="constrained")
    axes.plot(coverage, accuracy, marker=".", markersize=3)
    axes.axhline(calibration.TARGET_ACCURACY, color="gray", linestyle="--", linewidth=1)
    if suggestion:
        minimum, covered, right = suggestion
        axes.plot([covered], [right], "o", color="tab:red")
        # The curve falls from the upper left to the lower right: the label goes above it
        # to the right of the point, or below it to the left.
        left = covered < 0.5
        axes.annotate(f"--min-confidence {minimum:.2f}\nanswers {covered * 100:.0f}%, "
                      f"{right * 100:.1f}% right", (covered, right), textcoords="offset points",
                      xytext=(12, 12) if left else (-12, -12), ha="left" if left else "right",
                      va="bottom" if left else "top")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(max(0.0, min(accuracy.min(), calibration.TARGET_ACCURACY) - 0.05), 1.01)
    axes.set_xlabel("share of test images answered")
    axes.set_ylabel("accuracy on the answered images")
    axes.set_title("What 'unknown' below a confidence buys")
    axes.grid(alpha=0.3)
    reports.save_figure(figure, path)

