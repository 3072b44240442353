"""--find-label-issues' library part: out-of-sample probabilities by k-fold cross-validation,
cleanlab's ranking of the labels that are probably wrong, and what is saved of it."""

import csv
import logging
import os

import cv2
import numpy as np
import pytest

from classifier import label_issues
from classifier.cli import UserError

CLASSES = ["hat", "shirt", "shoes"]
FLIPPED = [3, 17, 29, 41, 55]


def recorded_folds(y, folds, seed=0):
    """The (train, held-out) positions out_of_sample_probabilities asks for, and its result
    when each held-out image is 'predicted' as a row that names its own position."""
    calls = []

    def fit_and_predict(train, held_out):
        calls.append((np.array(train), np.array(held_out)))
        return np.repeat(np.asarray(held_out, np.float32)[:, None], y.shape[1], axis=1)

    return calls, label_issues.out_of_sample_probabilities(y, folds, seed, fit_and_predict)


def noisy_dataset(seed=0):
    """60 images of 3 classes, probabilities fairly sure of the true class, and the targets
    with FLIPPED given a wrong class."""
    rng = np.random.default_rng(seed)
    true = np.arange(60) % 3
    probabilities = rng.uniform(0.02, 0.2, (60, 3))
    probabilities[np.arange(60), true] = rng.uniform(0.6, 0.95, 60)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    given = true.copy()
    given[FLIPPED] = (given[FLIPPED] + 1 + rng.integers(2, size=len(FLIPPED))) % 3
    return np.eye(3, dtype=np.float32)[given], probabilities.astype(np.float32), true


@pytest.mark.parametrize("multi_label", [False, True])
def test_every_image_is_predicted_once_by_a_model_that_never_trained_on_it(multi_label,
                                                                          caplog):
    rng = np.random.default_rng(1)
    y = ((rng.random((50, 3)) < 0.4) * 1.0 if multi_label
         else np.eye(3)[np.arange(50) % 3])
    with caplog.at_level(logging.INFO):
        calls, found = recorded_folds(y, 4)
    assert len(calls) == 4 and "fold 4 of 4" in caplog.text
    held = np.concatenate([held_out for _, held_out in calls])
    assert sorted(held) == list(range(50))  # disjoint, and covering every image
    for train, held_out in calls:
        assert not set(train) & set(held_out)
        assert sorted(np.concatenate([train, held_out])) == list(range(50))
    # Each image's row is the one its own fold's model gave.
    assert found.dtype == np.float32
    np.testing.assert_array_equal(found[:, 0], np.arange(50))
    if not multi_label:  # stratified: every fold holds out images of every class
        for _, held_out in calls:
            assert set(y[held_out].argmax(axis=1)) == {0, 1, 2}


def test_the_folds_are_the_same_for_the_same_seed_and_differ_for_another():
    y = np.eye(3)[np.arange(30) % 3]
    first, again, other = (recorded_folds(y, 3, seed)[0] for seed in (5, 5, 6))
    held = [[list(held_out) for _, held_out in calls] for calls in (first, again, other)]
    assert held[0] == held[1] and held[0] != held[2]


def test_a_class_smaller_than_the_folds_lowers_their_number_with_a_warning(caplog):
    y = np.eye(3)[[0] * 10 + [1] * 10 + [2] * 2]
    calls, found = recorded_folds(y, 4)
    assert len(calls) == 2
    assert "class index 2 has only 2 training images" in caplog.text
    assert sorted(np.concatenate([held_out for _, held_out in calls])) == list(range(22))


def test_a_class_of_one_image_or_a_single_image_cannot_be_cross_validated():
    with pytest.raises(UserError, match="class index 1 has 1 training image"):
        recorded_folds(np.eye(2)[[0, 0, 0, 1]], 4)
    with pytest.raises(UserError, match="at least 2 are needed"):
        recorded_folds(np.array([[1.0, 1.0]]), 4)


def test_the_planted_wrong_labels_come_first_with_the_true_class_suggested():
    y, probabilities, true = noisy_dataset()
    issues = label_issues.find(y, probabilities, multi_label=False)
    top = issues[:len(FLIPPED)]
    assert sorted(issue.position for issue in top) == FLIPPED
    assert [issue.suggested for issue in top] == [int(true[issue.position]) for issue in top]
    scores = [issue.label_quality for issue in issues]
    assert scores == sorted(scores)  # the least likely label first
    # The score is the probability of the given label.
    assert top[0].label_quality == pytest.approx(
        probabilities[top[0].position, y[top[0].position].argmax()])


def test_clean_labels_give_no_issues():
    _, probabilities, true = noisy_dataset()
    assert label_issues.find(np.eye(3)[true], probabilities, multi_label=False) == []


def test_a_multi_label_image_with_a_missing_or_extra_label_comes_first():
    rng = np.random.default_rng(2)
    truth = rng.random((80, 4)) < 0.4
    probabilities = np.where(truth, rng.uniform(0.7, 0.95, truth.shape),
                             rng.uniform(0.02, 0.2, truth.shape)).astype(np.float32)
    given = truth.copy()
    wrong = [5, 10, 20]
    given[wrong, 1] = ~given[wrong, 1]
    issues = label_issues.find(given * 1.0, probabilities, multi_label=True)
    assert sorted(issue.position for issue in issues[:3]) == wrong
    for issue in issues[:3]:
        assert issue.suggested == np.flatnonzero(truth[issue.position]).tolist()


def test_the_csv_and_the_gallery_say_what_is_wrong_and_what_the_model_suggests(tmp_path):
    y, probabilities, true = noisy_dataset()
    issues = label_issues.find(y, probabilities, multi_label=False)
    paths = [f"/data/{CLASSES[label]}/photo-{position:03d}-with-a-rather-long-name.jpg"
             for position, label in enumerate(y.argmax(axis=1))]
    label_issues.save(issues, paths, y, probabilities, CLASSES, str(tmp_path), False)
    with open(tmp_path / label_issues.FILE, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["rank", "path", "label", "suggested", "suggested_probability",
                                 "label_quality"]
    assert [row["rank"] for row in rows] == [str(rank) for rank in range(1, len(issues) + 1)]
    first, position = rows[0], issues[0].position
    assert first["path"] == paths[position]
    assert first["label"] == CLASSES[y[position].argmax()]
    assert first["suggested"] == CLASSES[true[position]]
    assert first["suggested_probability"] == f"{probabilities[position, true[position]]:.4f}"
    assert first["label_quality"] == f"{issues[0].label_quality:.4f}"

    pictures = np.random.default_rng(3).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    label_issues.save_gallery(pictures, issues, paths, y, probabilities, CLASSES,
                              str(tmp_path), shown=4)
    picture = cv2.imread(str(tmp_path / label_issues.GALLERY))
    assert picture is not None and picture.shape[0] > 200 and picture.shape[1] > 600


def test_a_multi_label_csv_joins_several_classes(tmp_path):
    y = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    probabilities = np.array([[0.9, 0.8, 0.1], [0.1, 0.9, 0.2]], np.float32)
    issues = [label_issues.Issue(0, 0.2, [0, 1])]
    label_issues.save(issues, ["a.jpg", "b.jpg"], y, probabilities, CLASSES, str(tmp_path),
                      True)
    with open(tmp_path / label_issues.FILE, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert (row["label"], row["suggested"], row["suggested_probability"]) == \
        ("hat;shoes", "hat;shirt", "0.9000;0.8000")


def test_no_issues_still_give_the_header_and_a_picture_that_says_so(tmp_path):
    y, probabilities, _ = noisy_dataset()
    label_issues.save([], [], y, probabilities, CLASSES, str(tmp_path), False)
    with open(tmp_path / label_issues.FILE) as handle:
        assert handle.read().splitlines() == [
            "rank,path,label,suggested,suggested_probability,label_quality"]
    label_issues.save_gallery([], [], [], y, probabilities, CLASSES, str(tmp_path))
    assert os.path.getsize(tmp_path / label_issues.GALLERY) > 0


def test_the_report_lines_give_the_images_the_folds_and_the_count():
    issues = [label_issues.Issue(position, 0.1, 0) for position in range(87)]
    said = " ".join(label_issues.lines(issues, 3068, 4, 10, 738))
    assert "3,068 training images (4 folds of 10 epochs, 12.3 min): 87 likely label " \
           "issues, ranked in label_issues.csv" in said
    assert "no likely label issues" in label_issues.lines([], 50, 2, 1, 20)[0]
