"""main.py dispatches to the same code as train.py and predict.py, in both spellings."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import demo
import main
from conftest import ROOT, write_image
from test_predict import LINE


def test_predict_spellings_run_predict(trained_run, capsys):
    image = os.path.join(trained_run["dataset"], "green_shoes", "green_shoes_0002.jpg")
    model_flags = ["--model", os.path.join(trained_run["output"], "vgg_model.keras"),
                   "--labels", os.path.join(trained_run["output"], "labels.pickle"),
                   "--output", os.path.join(trained_run["output"], "via_main")]
    assert main.main(["-predict", image, *model_flags]) == 0
    assert main.main(["predict", "--image", image, *model_flags]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and LINE.match(lines[0])


def test_train_spellings_reach_train(tmp_path, caplog):
    for spelling in ("train", "-train"):
        assert main.main([spelling, "--dataset", str(tmp_path / "absent"),
                          "--output", str(tmp_path / "out"), "--logs", str(tmp_path)]) == 2
    assert caplog.text.count("dataset folder not found") == 2


def test_unknown_command_prints_usage(capsys):
    assert main.main(["fly"]) == 2
    assert "python main.py train" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_generates_the_dataset_trains_and_predicts_held_back_images(tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main([], per_class=6,
                     train_flags=["--image-size", "32", "--epochs", "1", "--batch-size", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"test accuracy: \d\.\d\d", lines[-1])
    assert sorted(os.listdir(tmp_path / "Dataset")) == sorted([".demo-dataset", *demo.CLASSES])
    predicted = [line for line in lines if LINE.match(line)]
    assert len(predicted) == len(demo.CLASSES)
    assert all("demo_samples" in line for line in predicted)
    assert len(os.listdir(tmp_path / "Output" / "predictions")) == len(demo.CLASSES)
    assert (tmp_path / "Output" / "vgg_model.keras").exists()


@pytest.mark.slow
def test_the_demo_maps_a_nan_loss_to_its_exit_code_like_train_py(tmp_path, monkeypatch,
                                                                  caplog):
    monkeypatch.chdir(tmp_path)
    code = main.main([], per_class=6, train_flags=["--image-size", "32", "--epochs", "3",
                                                   "--lr", "1e6"])
    assert code == 3 and "lower learning rate" in caplog.text


def test_demo_trains_a_users_own_dataset_with_the_default_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("cats", "dogs"):
        write_image(tmp_path / "Dataset" / name / "a.png", np.zeros((8, 8, 3)))
    seen = {}

    def fake_training(args):
        seen["args"] = args
        return SimpleNamespace(model="m", output="Output", tensorboard_run="logs/run",
                               epochs_run=1, seconds=1.0, test_accuracy=0.5, interrupted=0)

    assert main.main([], run_training=fake_training) == 0
    assert sorted(os.listdir(tmp_path / "Dataset")) == ["cats", "dogs"]
    assert seen["args"].image_size == 64 and seen["args"].epochs == 100


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, message", [
    ("main.py", ["fly"], "python main.py train"),
    ("predict.py", ["--image", "x.jpg", "--model", "none.keras"], "train one first"),
    ("export.py", ["--model", "none.keras"], "train one first"),
])
def test_no_script_starts_with_cuda_lines_on_a_machine_without_a_gpu(tmp_path, script, flags,
                                                                     message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert "cuInit" not in result.stderr and "cuda drivers" not in result.stderr
    assert "Traceback" not in result.stderr
