"""Training images whose label is probably wrong (--find-label-issues), found before training.

cleanlab's confident learning (Northcutt et al., 2021) compares each image's given label with
what a model predicts for it, and needs out-of-sample probabilities: a model that has trained
on an image has learnt its label, right or wrong. So the training part (never the test part)
is split into k folds, and a fresh model trained on k-1 of them predicts the held-out one;
the training itself is the caller's fit_and_predict, so that each fold trains exactly as
train.py does. cleanlab then ranks the images it thinks mislabelled, the least likely label
first. It ranks, it does not decide: the list is what a person should look at, not what to
delete.

label_issues.csv holds the ranking. For a multi-label model, label and suggested name
several classes, joined with ";", and suggested_probability gives one probability per
suggested class in the same order. label_issues.png shows the top of the list.

Positions are rows of the training part: y, probabilities, pictures and paths are all
indexed by them.
"""

import logging
import os
import textwrap
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display
import matplotlib.pyplot as plt
import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.multilabel_classification import filter as multilabel_filter
from cleanlab.multilabel_classification import rank as multilabel_rank
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import KFold, StratifiedKFold

from classifier import artifacts, reports
from classifier.cli import UserError

log = logging.getLogger(__name__)

FILE = "label_issues.csv"
GALLERY = "label_issues.png"
# A multi-label model suggests every class it gives at least this probability.
SUGGESTION_THRESHOLD = 0.5
COLUMNS = 4  # of the gallery
NAME_SHOWN = 28  # characters of a file name above its picture; the CSV has the whole path
LINE_SHOWN = 36  # characters of a title line before it wraps: several labels would overlap


@dataclass
class Issue:
    """One image whose label is probably wrong: its position in the training part, cleanlab's
    label quality score (0 to 1, low: probably wrong), and the class the cross-validated models
    suggest instead (an index; for a multi-label model a list of indices, maybe empty)."""
    position: int
    label_quality: float
    suggested: object


def out_of_sample_probabilities(y, folds, seed, fit_and_predict):
    """Every image's probabilities from a model that never trained on it, (images, classes)
    float32. y: the targets, one 0/1 column per class. fit_and_predict(train_positions,
    held_out_positions) trains a fresh model on the first and returns its probabilities for
    the second, (held out, classes).

    Where each image has one label, the folds keep the classes' proportions (stratified); a
    class with fewer images than folds lowers the number of folds to its count, with a
    warning, since each fold needs an image of every class to hold out and several to train
    on. A class of one image, or fewer than two images in all, leaves no two folds: a
    UserError. Targets where some image has several labels, or none, are split without
    stratification (plain shuffled folds), into at most as many folds as there are images;
    multi-label targets with exactly one label per image are stratified like single-label
    ones."""
    y = np.asarray(y)
    images = len(y)
    single_label = bool(np.all(y.sum(axis=1) == 1))
    if single_label:
        counts = y.sum(axis=0).astype(int)
        present = np.flatnonzero(counts)
        smallest = present[np.argmin(counts[present])]
        possible = min(folds, counts[smallest])
        if possible < 2:
            raise UserError(f"cannot cross-validate to find label issues: class index "
                            f"{smallest} has {counts[smallest]} training image(s); every class "
                            "needs at least 2")
        if possible < folds:
            log.warning("class index %d has only %d training images, fewer than the %d folds "
                        "asked for: finding label issues with %d folds", smallest,
                        counts[smallest], folds, possible)
        splitter = StratifiedKFold(possible, shuffle=True, random_state=seed)
    else:
        possible = min(folds, images)
        if possible < 2:
            raise UserError(f"cannot cross-validate to find label issues on {images} "
                            "training image(s): at least 2 are needed")
        splitter = KFold(possible, shuffle=True, random_state=seed)
    probabilities = np.zeros(y.shape, np.float32)
    for fold, (train, held_out) in enumerate(splitter.split(np.zeros(images),
                                                            y.argmax(axis=1)), start=1):
        log.info("fold %d of %d: training on %d images, predicting %d", fold, possible,
                 len(train), len(held_out))
        probabilities[held_out] = fit_and_predict(train, held_out)
    return probabilities


def find(y, probabilities, multi_label):
    """The images whose label is probably wrong, as Issues, the least likely label first
    (cleanlab's self-confidence: the probability of the given label, or for a multi-label
    model those of each class's yes or no, combined)."""
    y = np.asarray(y)
    # n_jobs=1: cleanlab's worker processes are forked, which is unsafe in a process where
    # TensorFlow's threads run, and the counting is quick on one core anyway.
    if multi_label:
        labels = [np.flatnonzero(row).tolist() for row in y]
        ranked = multilabel_filter.find_label_issues(
            labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
        scores = multilabel_rank.get_label_quality_scores(labels, probabilities,
                                                          method="self_confidence")
    else:
        labels = y.argmax(axis=1)
        ranked = find_label_issues(labels, probabilities,
                                   return_indices_ranked_by="self_confidence", n_jobs=1)
        scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return [Issue(int(position), float(scores[position]),
                  suggestion(probabilities[position], multi_label)) for position in ranked]


def suggestion(probability, multi_label):
    """The class the models suggest: the most probable, or for a multi-label model the list
    of those at or above SUGGESTION_THRESHOLD."""
    if multi_label:
        return np.flatnonzero(probability >= SUGGESTION_THRESHOLD).tolist()
    return int(np.argmax(probability))


def _suggested(issue):
    """The suggested class indices as a list, for one label or several."""
    return issue.suggested if isinstance(issue.suggested, list) else [issue.suggested]


def save(issues, paths, y, probabilities, classes, output, multi_label):
    """<output>/label_issues.csv: one row per issue, ranked from 1 (see above)."""
    def row(rank, issue):
        given = np.flatnonzero(y[issue.position]) if multi_label else [
            int(np.argmax(y[issue.position]))]
        suggested = _suggested(issue)
        return [rank, paths[issue.position], ";".join(classes[index] for index in given),
                ";".join(classes[index] for index in suggested),
                ";".join(f"{probabilities[issue.position, index]:.4f}" for index in suggested),
                f"{issue.label_quality:.4f}"]

    artifacts.write_csv(os.path.join(output, FILE),
                        ["rank", "path", "label", "suggested", "suggested_probability",
                         "label_quality"],
                        [row(rank, issue) for rank, issue in enumerate(issues, start=1)])


def short_name(path):
    """path's file name, its middle left out where it is too long to fit above a picture."""
    name = os.path.basename(path)
    if len(name) <= NAME_SHOWN:
        return name
    half = (NAME_SHOWN - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


def gallery_title(rank, path, given, suggested, probability, classes):
    """The lines above a picture: its rank and file name, its label, the models'."""
    labelled = ", ".join(classes[index] for index in given) or "none"
    model = ", ".join(f"{classes[index]} {probability[index] * 100:.0f}%"
                      for index in suggested) or "none"
    return "\n".join([f"{rank}. {short_name(path)}",
                      textwrap.fill(f"labelled: {labelled}", LINE_SHOWN),
                      textwrap.fill(f"model: {model}", LINE_SHOWN)])


def save_gallery(pictures, issues, paths, y, probabilities, classes, output, shown=24):
    """<output>/label_issues.png: the first shown issues' pictures (uint8 RGB, indexed by
    position), each under its rank, file name, given label and the models' suggestion."""
    top = issues[:shown]
    rows = max(1, -(-len(top) // COLUMNS))
    figure, grid = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * 2.6, rows * 3.1 + 0.5),
                                squeeze=False, layout="constrained")
    for axes in grid.flat:
        axes.axis("off")
    for rank, (axes, issue) in enumerate(zip(grid.flat, top), start=1):
        axes.imshow(pictures[issue.position])
        axes.set_title(gallery_title(rank, paths[issue.position],
                                     np.flatnonzero(y[issue.position]), _suggested(issue),
                                     probabilities[issue.position], classes), fontsize=8)
    if not top:
        grid[0, 0].text(0, 0.5, "No likely label issues found.", fontsize=12)
    figure.suptitle("Training images whose label is probably wrong, the most likely first"
                    if top else "Label issues")
    reports.save_figure(figure, os.path.join(output, GALLERY))


def lines(issues, checked, folds, epochs, seconds):
    """What report.html says of the search: how many images were cross-validated, how, and
    how many likely label issues it found."""
    found = (f"{len(issues):,} likely label issue{'' if len(issues) == 1 else 's'}, ranked in "
             f"{FILE}" if issues else "no likely label issues")
    took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    said = [f"Cross-validated {checked:,} training images ({folds} folds of {epochs} epochs, "
            f"{took}): {found}."]
    if issues:
        said.append("Each was predicted by a model that never trained on it. The list is "
                    "what to look at first, not what to delete: some are hard or ambiguous "
                    f"images with a right label. {GALLERY} shows the top of the list.")
    return said
