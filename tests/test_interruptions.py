"""Interruptions and faults: kill -9 and Ctrl-C resume, NaN losses, bad output locations."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import predict
import train
from classifier import run_folder, settings
from conftest import ROOT, TINY_FLAGS, write_image


def command(dataset, work, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", dataset,
            "--output", str(work / "Output"), "--logs", str(work / "logs"),
            *TINY_FLAGS[:-4], "--epochs", "4", *extra]


def start_and_stop_after_an_epoch(cmd, work, stop_signal):
    """Start training and send stop_signal once the first epoch has been backed up."""
    marker = work / "Output" / "backup" / "training_metadata.json"
    # A shell that started us in the background may have set SIGINT to "ignore", and a child
    # would inherit that: give the child Ctrl-C back, as in a terminal.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    process.send_signal(stop_signal)
    out, err = process.communicate(timeout=240)
    return process.returncode, out, err


def history_epochs(work):
    with open(work / "Output" / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_finishes(demo_dataset, tmp_path):
    cmd = command(demo_dataset, tmp_path)
    code, _, _ = start_and_stop_after_an_epoch(cmd, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    stopped_after = json.load(open(tmp_path / "Output" / "backup" / "training_metadata.json"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"after epoch {stopped_after['epoch']}" in result.stderr
    assert sorted(set(history_epochs(tmp_path))) == [0, 1, 2, 3]
    assert not (tmp_path / "Output" / "backup").exists()
    for name in ("vgg_model.keras", "training_plot.png", "classification_report.txt"):
        assert (tmp_path / "Output" / name).exists()
    runs = os.listdir(tmp_path / "logs")
    assert len(runs) == 1, "the resumed run keeps writing to the same TensorBoard run"


@pytest.mark.slow
def test_ctrl_c_saves_what_is_done_exits_130_and_fresh_starts_over(demo_dataset, tmp_path):
    cmd = command(demo_dataset, tmp_path, "--epochs", "30")
    code, out, err = start_and_stop_after_an_epoch(cmd, tmp_path, signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "run the same command again to resume" in err
    assert "Traceback" not in err
    assert (tmp_path / "Output" / "vgg_model.keras").exists()
    assert (tmp_path / "Output" / "backup").exists()
    result = subprocess.run(cmd[:-2] + ["--epochs", "1", "--fresh"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" not in result.stderr
    assert history_epochs(tmp_path) == [0]


def test_resuming_with_other_settings_is_refused(demo_dataset, tmp_path, caplog):
    args = ["--dataset", demo_dataset, "--output", str(tmp_path / "Output"),
            "--logs", str(tmp_path / "logs"), *TINY_FLAGS]
    os.makedirs(tmp_path / "Output" / "backup")
    resumed = run_folder.resume_settings(settings.parse_args(args))
    json.dump({"settings": dict(resumed, lr=0.1), "run_name": "old"},
              open(tmp_path / "Output" / "backup" / "run.json", "w"))
    assert train.main(args) == 2
    assert "other settings (lr)" in caplog.text and "--fresh" in caplog.text


@pytest.mark.slow
def test_a_nan_loss_stops_with_advice_and_keeps_no_broken_model(demo_dataset, tmp_path,
                                                                caplog):
    code = train.main(["--dataset", demo_dataset, "--output", str(tmp_path / "Output"),
                       "--logs", str(tmp_path / "logs"), *TINY_FLAGS[:-4], "--epochs", "3",
                       "--lr", "1e6", "--no-checkpoint-best-only"])
    assert code == 3
    assert "NaN" in caplog.text and "lower learning rate" in caplog.text
    assert not (tmp_path / "Output" / "vgg_model.keras").exists()
    assert not (tmp_path / "Output" / "backup").exists()
    assert os.listdir(tmp_path / "Output" / "checkpoints") == []


def test_an_output_location_that_cannot_be_created_fails_before_training(demo_dataset,
                                                                         tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code = train.main(["--dataset", demo_dataset, "--output", str(blocker / "Output"),
                       "--logs", str(tmp_path / "logs")])
    assert code == 2
    assert "cannot create" in caplog.text and "loading" not in caplog.text


def test_too_little_disk_space_fails_before_training(demo_dataset, tmp_path, monkeypatch,
                                                     caplog):
    usage = shutil._ntuple_diskusage(total=10**9, used=10**9 - 10**6, free=10**6)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    code = train.main(["--dataset", demo_dataset, "--output", str(tmp_path / "Output"),
                       "--logs", str(tmp_path / "logs"), *TINY_FLAGS])
    assert code == 2
    assert "MB free" in caplog.text
    assert not (tmp_path / "Output" / "history.csv").exists()


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_clear_error(demo_dataset, tmp_path, monkeypatch,
                                                     caplog):
    def disk_full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(keras.Model, "save", disk_full)
    code = train.main(["--dataset", demo_dataset, "--output", str(tmp_path / "Output"),
                       "--logs", str(tmp_path / "logs"), *TINY_FLAGS[:-4], "--epochs", "1",
                       "--no-checkpoint-best-only", "--checkpoint-every", "5"])
    assert code == 2
    assert "No space left on device" in caplog.text
    assert not (tmp_path / "Output" / "vgg_model.keras").exists()


def test_a_model_with_python_code_is_refused_unless_trusted(trained_run, tmp_path, capsys,
                                                           caplog):
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Lambda(lambda x: x[:, 0, 0, :] * 0.0)(inputs)
    outputs = keras.layers.Dense(8, activation="softmax")(outputs)
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, outputs).save(path)
    image = write_image(tmp_path / "x.png", np.full((32, 32, 3), 100))
    flags = ["--image", image, "--model", path, "--output", str(tmp_path / "out"),
             "--labels", os.path.join(trained_run["output"], "labels.pickle")]
    assert predict.main(flags) == 2
    assert "Lambda layer" in caplog.text and "--unsafe-model" in caplog.text
    assert predict.main([*flags, "--unsafe-model"]) == 0
    assert capsys.readouterr().out.count("x.png: ") == 1
