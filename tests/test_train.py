"""End to end: real (tiny) training runs and everything they leave behind."""

import csv
import glob
import json
import os
import pty
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import train
from classifier import artifacts
from conftest import ROOT, TINY_FLAGS, write_image

CHECKPOINT_NAME = re.compile(r"^VGG_epoch-(\d{2})_loss-\d+\.\d{4}_val_loss-\d+\.\d{4}\.keras$")


def test_training_leaves_every_artifact(trained_run):
    output = trained_run["output"]
    for name in ("vgg_model.keras", "labels.pickle", "labels.json", "history.csv",
                 "classification_report.txt", "confusion_matrix.png", "training_plot.png",
                 "config.json"):
        assert os.path.getsize(os.path.join(output, name)) > 0, name
    assert not glob.glob(os.path.join(output, ".tmp-*"))


def test_checkpoints_carry_epoch_loss_and_val_loss_in_their_names(trained_run):
    names = sorted(os.listdir(os.path.join(trained_run["output"], "checkpoints")))
    matches = [CHECKPOINT_NAME.match(name) for name in names]
    assert all(matches), names
    assert [m.group(1) for m in matches] == ["01", "02"]


def test_history_has_one_row_per_epoch_with_the_learning_rate(trained_run):
    with open(os.path.join(trained_run["output"], "history.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(rows[0])
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.0007)


def test_report_names_every_class_and_the_model_loads(trained_run):
    report = open(os.path.join(trained_run["output"], "classification_report.txt")).read()
    classes = sorted(os.listdir(trained_run["dataset"]))
    assert all(name in report for name in classes)
    model = keras.models.load_model(os.path.join(trained_run["output"], "vgg_model.keras"))
    assert model.output_shape == (None, len(classes))


def test_config_records_the_resolved_settings(trained_run):
    config = json.load(open(os.path.join(trained_run["output"], "config.json")))
    assert config["epochs"] == 2 and config["image_size"] == 32 and config["lr"] == 0.0007
    assert config["run_name"] == "tiny" and len(config["classes"]) == 8


@pytest.mark.slow
def test_two_class_datasets_train_with_a_two_way_softmax(tmp_path):
    rng = np.random.default_rng(1)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for index in range(8):
            write_image(tmp_path / "data" / name / f"{index}.png",
                        np.clip(rng.normal(colour, 20, (24, 24, 3)), 0, 255))
    output = tmp_path / "Output"
    code = train.main(["--dataset", str(tmp_path / "data"), "--output", str(output),
                       "--logs", str(tmp_path / "logs"), "--test-size", "0.25",
                       *TINY_FLAGS[:-4], "--epochs", "1"])
    assert code == 0
    model = keras.models.load_model(str(output / "vgg_model.keras"))
    assert model.output_shape == (None, 2)
    assert list(artifacts.load_labels(str(output / "labels.pickle")).classes_) == ["blue", "red"]


def test_one_class_is_a_one_line_error_with_exit_code_2(tmp_path, caplog):
    write_image(tmp_path / "only" / "a.png", np.zeros((8, 8, 3)))
    write_image(tmp_path / "only" / "b.png", np.zeros((8, 8, 3)))
    assert train.main(["--dataset", str(tmp_path), "--output", str(tmp_path / "out"),
                       "--logs", str(tmp_path / "logs")]) == 2
    assert "at least 2 class folders" in caplog.text


def test_empty_dataset_is_an_error(tmp_path, caplog):
    (tmp_path / "cats").mkdir()
    assert train.main(["--dataset", str(tmp_path), "--output", str(tmp_path / "out"),
                       "--logs", str(tmp_path / "logs")]) == 2
    assert "no images found" in caplog.text


def test_missing_dataset_exits_2_without_a_traceback_or_cuda_lines(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset",
                             str(tmp_path / "missing"), "--output", str(tmp_path / "out"),
                             "--logs", str(tmp_path / "logs")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "dataset folder not found" in result.stderr
    assert "Traceback" not in result.stderr
    # Without a GPU, TensorFlow's start-up says so in lines a beginner reads as errors.
    assert "cuInit" not in result.stderr and "cuda drivers" not in result.stderr


def run_in_a_terminal(command):
    """What command prints to a (pseudo) terminal, and its exit status."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child, its standard streams on the terminal
        os.execv(command[0], command)
    output = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed the terminal: it has ended
            break
        if not chunk:
            break
        output += chunk
    os.close(terminal)
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.slow
def test_a_terminal_shows_the_progress_bar_and_a_pipe_one_line_per_epoch(demo_dataset,
                                                                        tmp_path):
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", demo_dataset,
               "--logs", str(tmp_path / "logs"), *TINY_FLAGS[:-4], "--epochs", "1"]
    piped = subprocess.run(command + ["--output", str(tmp_path / "piped")],
                           capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert re.search(r"^\d+/\d+ - \d+s - ", piped.stdout, re.MULTILINE)  # Keras's epoch line
    assert "━" not in piped.stdout
    shown, code = run_in_a_terminal(command + ["--output", str(tmp_path / "terminal")])
    assert code == 0, shown[-2000:]
    assert "━" in shown  # Keras's progress bar, drawn as the steps go
