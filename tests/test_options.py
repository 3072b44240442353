"""Training options: config files, pre-split folders, class weights, early stopping."""

import csv
import json
import os
import shutil

import pytest

import demo
import train
from classifier import callbacks, images, settings
from conftest import TINY_FLAGS


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 7, "batch_size": 16, "horizontal_flip": False,
                                  "data-mode": "stream", "lr": 0.001, "fresh": True}))
    args = settings.parse_args(["--config", str(config), "--epochs", "3"])
    assert (args.epochs, args.batch_size, args.lr) == (3, 16, 0.001)
    assert args.horizontal_flip is False and args.data_mode == "stream" and args.fresh
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text("epochs: 5\nimage_size: 32\naugment: layers\n")
    args = settings.parse_args(["--config", str(yaml_config)])
    assert (args.epochs, args.image_size, args.augment) == (5, 32, "layers")


@pytest.mark.parametrize("content, message", [
    ('{"epoch": 3}', "unknown setting in the config file: epoch"),
    ('{"epochs": 3', "not valid JSON or YAML"),
    ('[1, 2]', "must hold a mapping"),
])
def test_config_file_mistakes_are_one_line_errors(tmp_path, caplog, content, message):
    config = tmp_path / "run.json"
    config.write_text(content)
    assert train.main(["--config", str(config)]) == 2
    assert message in caplog.text


def test_config_values_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"augment": "sideways"}')
    with pytest.raises(SystemExit) as stopped:
        settings.parse_args(["--config", str(config)])
    assert stopped.value.code == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_a_missing_config_file_is_a_one_line_error(tmp_path, caplog):
    assert train.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the config file" in caplog.text


@pytest.fixture(scope="module")
def pre_split(tmp_path_factory):
    """train/, validation/ and test/ folders like clothing-dataset-small's; train/ unbalanced."""
    root = tmp_path_factory.mktemp("presplit")
    for folder, per_class, seed in (("train", 10, 1), ("validation", 3, 2), ("test", 4, 3)):
        demo.generate(str(root / folder), per_class=per_class, seed=seed, size=40)
    for path in images.list_images(str(root / "train" / "red_shoes"))[3:]:
        os.remove(path)  # 3 red_shoes against 10 of every other class
    return root


@pytest.mark.slow
def test_pre_split_folders_are_used_as_given_with_balanced_weights(pre_split, tmp_path):
    output = tmp_path / "Output"
    code = train.main(["--dataset", str(pre_split / "train"), "--val-dir",
                       str(pre_split / "validation"), "--test-dir", str(pre_split / "test"),
                       "--class-weight", "balanced", "--output", str(output), "--logs",
                       str(tmp_path / "logs"), *TINY_FLAGS])
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert (config["train_images"], config["validation_images"], config["test_images"]) == (
        73, 24, 32)
    weights = config["class_weights"]
    red_shoes = config["classes"].index("red_shoes")
    assert weights[str(red_shoes)] == pytest.approx(73 / (8 * 3))
    assert weights["0"] == pytest.approx(73 / (8 * 10))
    report = (output / "classification_report.txt").read_text()
    assert report.split("weighted avg")[1].split()[-1] == "32"  # every test image, only them
    with open(output / "history.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_a_test_folder_with_an_unknown_class_is_refused(pre_split, tmp_path, caplog):
    test_dir = tmp_path / "test"
    shutil.copytree(pre_split / "test", test_dir)
    (test_dir / "red_dress").rename(test_dir / "purple_hat")
    code = train.main(["--dataset", str(pre_split / "train"), "--test-dir", str(test_dir),
                       "--output", str(tmp_path / "Output"), *TINY_FLAGS])
    assert code == 2
    assert "has classes that" in caplog.text and "purple_hat" in caplog.text


@pytest.mark.slow
def test_early_stopping_stops_when_val_loss_stalls(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "6"
    # A learning rate far too small to move the weights, and frozen BatchNormalization
    # statistics: val_loss never improves after the first epoch, so patience 1 stops
    # training after epoch 2.
    code = train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--lr", "1e-12", "--bn-momentum", "1.0",
                       "--early-stopping", "1", *flags])
    assert code == 0
    with open(output / "history.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_early_stopping_is_off_by_default():
    assert settings.parse_args([]).early_stopping == 0
    assert callbacks.early_stopping(0) == []
    (stopper,) = callbacks.early_stopping(settings.parse_args(["--early-stopping", "4"])
                                          .early_stopping)
    assert type(stopper).__name__ == "EarlyStopping"
    assert stopper.patience == 4 and stopper.restore_best_weights
