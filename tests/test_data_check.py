"""The data check: copies found (and colour variants not), conflicting labels, leaks across
pre-split folders, a split that keeps copies together (and is today's split without them),
split.csv, --check-only and --find-label-issues."""

import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest

import train
from classifier import artifacts, data_check, dataset, images
from conftest import TINY_FLAGS, write_image

SIZE = 64


def photo(seed, side=120):
    """A photo-like picture: smooth random colour fields and a few shapes, each seed its own."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), (side, side),
                       interpolation=cv2.INTER_CUBIC)
    for _ in range(4):
        centre = tuple(int(value) for value in rng.integers(10, side - 10, 2))
        colour = tuple(int(value) for value in rng.integers(0, 256, 3))
        cv2.circle(field, centre, int(rng.integers(6, side // 4)), colour, -1)
    return field


def jpeg(image, quality):
    _, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1]


def crop(image, share):
    cut = int(image.shape[0] * share)
    return image[cut:-cut, cut:-cut]


def hue(image, degrees):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + degrees // 2) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


COPIES = {"resized": lambda image: cv2.resize(image, (70, 70), interpolation=cv2.INTER_AREA),
          "jpeg": lambda image: jpeg(image, 40), "mirrored": lambda image: image[:, ::-1],
          "cropped": lambda image: crop(image, 0.03), "identical": lambda image: image}
NOT_COPIES = {"hue": lambda image: hue(image, 120),
              "gray": lambda image: cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
                                                 cv2.COLOR_GRAY2RGB)}


def write_folder(root, classes=("a", "b", "c"), per_class=12, first_seed=0):
    """root/<class>/<n>.png, distinct photos; returns {name: path}."""
    paths = {}
    for number in range(len(classes) * per_class):
        label = classes[number % len(classes)]
        paths[f"{label}{number}"] = write_image(os.path.join(root, label, f"{number:03d}.png"),
                                                photo(first_seed + number))
    return paths


def check_folders(roots, multi_label=False):
    folders, _ = dataset.load_folders(roots, dataset.Labelling(multi_label),
                                      dataset.Decoding(SIZE), seed=1)
    findings = data_check.check(data_check.records_of(folders, multi_label),
                                data_check.images_of(folders), SIZE)
    return folders, findings


def grouped_names(findings):
    return sorted(sorted(os.path.basename(findings.records[member].path) for member in members)
                  for members in findings.groups)


def test_planted_copies_are_grouped_and_colour_variants_are_not(tmp_path):
    root = tmp_path / "data"
    write_folder(root)
    original = photo(0)  # a/000.png
    for kind, make in {**COPIES, **NOT_COPIES}.items():
        write_image(root / "a" / f"{kind}.png", make(original))
    _, findings = check_folders({"train": str(root)})
    assert grouped_names(findings) == [sorted(["000.png", *(f"{kind}.png" for kind in COPIES)])]
    assert not findings.conflicts and not findings.leaks


def test_a_folder_without_copies_has_no_groups_and_todays_split(tmp_path):
    root = tmp_path / "data"
    write_folder(root, per_class=20)
    folders, findings = check_folders({"train": str(root)})
    assert findings.groups == [] and findings.summary().startswith("data check: 60 images, 0 ")
    binarizer, targets = artifacts.fit_binarizer(folders["train"].labels, False)
    for val_size in (0.0, 0.2):
        today = dataset.split(folders, binarizer, targets, 0.15, 42, True, val_size=val_size)
        checked = dataset.split(folders, binarizer, targets, 0.15, 42, True, val_size=val_size,
                                groups=findings.group_numbers("train"))
        for part in ("train", "validation", "test"):
            assert getattr(checked, part).paths == getattr(today, part).paths


def test_copies_with_other_labels_are_conflicts_and_each_group_stays_in_one_part(tmp_path):
    root = tmp_path / "data"
    write_folder(root, per_class=20)
    for number in range(6):  # six photos, each with a copy, two of them filed under another class
        label = "abc"[number % 3]
        other = "abc"[(number + 1) % 3] if number < 2 else label
        write_image(root / other / f"copy{number}.png",
                    jpeg(photo(number), 60))
    folders, findings = check_folders({"train": str(root)})
    assert len(findings.groups) == 6 and len(findings.conflicts) == 2
    conflicting = {findings.records[member].label for number in findings.conflicts
                   for member in findings.groups[number]}
    assert len(conflicting) >= 2
    binarizer, targets = artifacts.fit_binarizer(folders["train"].labels, False)
    for seed in range(5):
        splits = dataset.split(folders, binarizer, targets, 0.3, seed, True, val_size=0.2,
                               groups=findings.group_numbers("train"))
        part_of = {path: part for path, _, part in dataset.split_rows(splits, binarizer.classes_)}
        assert len(part_of) == 66  # every image once
        for members in findings.groups:
            assert len({part_of[findings.records[member].path] for member in members}) == 1


def test_copies_across_given_folders_are_named_leaks(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test", per_class=3, first_seed=100)
    write_image(tmp_path / "test" / "b" / "leak.png", jpeg(photo(1), 50))  # train b/001.png
    _, findings = check_folders({"train": str(tmp_path / "train"),
                                 "test": str(tmp_path / "test")})
    leaked = findings.leaked("test")
    assert [os.path.basename(findings.records[36 + at].path) for at in leaked] == ["leak.png"]
    assert findings.leaked("train").size == 0


def test_oddities_small_long_and_grayscale_images_and_rare_classes(tmp_path):
    root = tmp_path / "data"
    write_folder(root, classes=("a", "b"), per_class=15)
    write_image(root / "a" / "small.png", cv2.resize(photo(50), (20, 20)))
    write_image(root / "a" / "long.png", cv2.resize(photo(51), (400, 100)))
    write_image(root / "a" / "gray.png", NOT_COPIES["gray"](photo(52)))
    for number in range(3):
        write_image(root / "rare" / f"{number}.png", photo(60 + number))
    _, findings = check_folders({"train": str(root)})

    def named(indices):
        return [os.path.basename(findings.records[index].path) for index in indices]
    assert named(findings.small_images) == ["small.png"]
    assert named(findings.extreme_aspect) == ["long.png"]
    assert named(findings.grayscale) == ["gray.png"]
    assert findings.tiny_classes == ["rare"] and findings.rare_classes == ["rare"]


def test_multi_label_records_join_their_labels(tmp_path):
    write_image(tmp_path / "data" / "red_dress" / "1.png", photo(1))
    write_image(tmp_path / "data" / "blue_dress" / "2.png", photo(1))
    write_image(tmp_path / "data" / "blue_shoes" / "3.png", photo(3))
    _, findings = check_folders({"train": str(tmp_path / "data")}, multi_label=True)
    assert findings.class_counts == {"blue": 2, "dress": 2, "red": 1, "shoes": 1}
    assert len(findings.conflicts) == 1


def tiny_dataset_with_copies(tmp_path, demo_dataset):
    """The demo dataset, with one photo copied twice within its class and once into another
    class: a group of four, with conflicting labels."""
    root = tmp_path / "data"
    shutil.copytree(demo_dataset, root)
    source = root / "red_dress" / sorted(os.listdir(root / "red_dress"))[0]
    picture = images.decode_image(str(source))
    write_image(root / "red_dress" / "copy_mirrored.png", picture[:, ::-1])
    write_image(root / "red_dress" / "copy_smaller.png", cv2.resize(picture, (40, 40)))
    write_image(root / "blue_dress" / "copy_elsewhere.png", picture)
    return str(root), str(source)


def read_split(output):
    with open(os.path.join(output, "split.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_run_keeps_copies_in_one_part_and_split_csv_is_what_it_trained_and_tested(
        demo_dataset, tmp_path):
    data, source = tiny_dataset_with_copies(tmp_path, demo_dataset)
    output = str(tmp_path / "Output")
    assert train.main(["--dataset", data, "--output", output, "--logs", str(tmp_path / "logs"),
                       "--val-size", "0.15", *TINY_FLAGS]) == 0
    rows = read_split(output)
    assert len(rows) == len(images.list_images(data)) == len({row["path"] for row in rows})
    config = json.loads(open(os.path.join(output, "config.json")).read())
    report = json.loads(open(os.path.join(output, "classification_report.json")).read())
    parts = [row["part"] for row in rows]
    assert parts.count("train") == config["train_images"]
    assert parts.count("validation") == config["validation_images"]
    assert parts.count("test") == config["test_images"] == report["macro avg"]["support"]
    copies = [row for row in rows if "copy_" in row["path"] or row["path"] == source]
    assert len(copies) == 4 and len({row["part"] for row in copies}) == 1
    assert all(row["labels"] == os.path.basename(os.path.dirname(row["path"])) for row in rows)
    check = json.loads(open(os.path.join(output, "data_check.json")).read())
    (group,) = check["groups_of_copies"]
    assert group["conflicting_labels"] and len(group["images"]) == 4
    page = open(os.path.join(output, "report.html")).read()
    assert "Your data" in page and "data_check.png" in page and "conflicting labels" in page


def test_check_only_trains_nothing_and_leaves_an_earlier_run_alone(demo_dataset, tmp_path):
    data, _ = tiny_dataset_with_copies(tmp_path, demo_dataset)
    output = tmp_path / "Output"
    output.mkdir()
    (output / "report.html").write_text("an earlier run")
    before = sorted(os.listdir(output))
    assert train.main(["--dataset", data, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--check-only", *TINY_FLAGS]) == 0
    assert sorted(set(os.listdir(output)) - {"cache", "check", ".lock"}) == before
    assert (output / "report.html").read_text() == "an earlier run"
    assert not (tmp_path / "logs").exists()
    written = set(os.listdir(output / "check"))
    assert {"data_check.html", "data_check.json", "duplicates.csv", "data_check.png"} <= written
    assert not written & {"vgg_model.keras", "checkpoints", "split.csv", "report.html"}
    with open(output / "check" / "duplicates.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4


@pytest.mark.slow
def test_a_resumed_run_keeps_its_split_and_refuses_a_changed_folder(demo_dataset, tmp_path):
    from test_networks import StopAt
    data, _ = tiny_dataset_with_copies(tmp_path, demo_dataset)
    flags = ["--dataset", data, "--output", str(tmp_path / "Output"), "--logs",
             str(tmp_path / "logs"), *TINY_FLAGS, "--epochs", "3"]
    assert train.main(flags, extra_callbacks=[StopAt(1)]) == 130
    first = read_split(str(tmp_path / "Output"))
    write_image(os.path.join(data, "red_dress", "added_later.png"), photo(7))
    assert train.main(flags) == 2  # another split would test on images it trained on
    os.remove(os.path.join(data, "red_dress", "added_later.png"))
    assert train.main(flags) == 0
    assert read_split(str(tmp_path / "Output")) == first


@pytest.mark.slow
def test_find_label_issues_ranks_planted_wrong_labels_first(tmp_path):
    import demo
    root = tmp_path / "data"
    classes = ["red_dress", "blue_pants", "green_shoes", "white_shoes"]
    demo.generate(str(root), per_class=40, seed=5, size=40, classes=classes, plain=True)
    # A test folder of its own: every image of root is cross-validated.
    demo.generate(str(tmp_path / "test"), per_class=3, seed=6, size=40, classes=classes,
                  plain=True)
    flipped = []
    for number, (source, target) in enumerate([("red_dress", "blue_pants"),
                                               ("blue_pants", "green_shoes"),
                                               ("green_shoes", "white_shoes"),
                                               ("white_shoes", "red_dress")]):
        name = sorted(os.listdir(root / source))[number]
        os.rename(root / source / name, root / target / f"flipped_{name}")
        flipped.append(str(root / target / f"flipped_{name}"))
    output = tmp_path / "Output"
    assert train.main(["--dataset", str(root), "--test-dir", str(tmp_path / "test"),
                       "--output", str(output), "--check-only",
                       "--find-label-issues", "--label-issue-folds", "3",
                       "--label-issue-epochs", "15", "--image-size", "32", "--workers", "2",
                       "--batch-size", "16"]) == 0
    with open(output / "check" / "label_issues.csv", newline="") as handle:
        ranked = [row["path"] for row in csv.DictReader(handle)]
    found = set(ranked[:2 * len(flipped)]) & set(flipped)
    assert len(found) >= 3, ranked[:10]  # 4, 4, 3, 4, 4 of 4 with seeds 5 to 9
    assert (output / "check" / "label_issues.png").exists()
    page = (output / "check" / "data_check.html").read_text()
    assert "label_issues.png" in page and "probably wrong" in page


@pytest.mark.slow
def test_a_test_folder_with_copies_of_training_photos_is_reported_with_and_without_them(
        demo_dataset, tmp_path):
    import demo
    test_folder = tmp_path / "test"
    demo.generate(str(test_folder), per_class=2, seed=9, size=48)
    copied = sorted(os.listdir(os.path.join(demo_dataset, "red_dress")))[0]
    shutil.copy(os.path.join(demo_dataset, "red_dress", copied),
                test_folder / "red_dress" / "copied.jpg")
    output = tmp_path / "Output"
    assert train.main(["--dataset", demo_dataset, "--test-dir", str(test_folder), "--output",
                       str(output), "--logs", str(tmp_path / "logs"), *TINY_FLAGS]) == 0
    check = json.loads((output / "data_check.json").read_text())
    assert check["copies_across_parts"] == [str(test_folder / "red_dress" / "copied.jpg")]
    page = (output / "report.html").read_text()
    assert "without the 1 that have a copy in training" in page
    assert len(read_split(str(output))) == 8 * 12 + 8 * 2 + 1  # nothing moved or left out
