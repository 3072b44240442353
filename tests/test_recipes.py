"""The fast recipe and its parts: one-cycle learning rates step by step and after a resume,
AdamW and label smoothing, the learning-rate range test, test-time augmentation."""

import csv
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
from classifier import artifacts, images, inference, run_folder, schedules, settings
from conftest import ROOT, TINY_FLAGS


def test_one_cycle_warms_up_peaks_and_anneals_to_zero_step_by_step():
    rate = schedules.learning_rate("onecycle", lr=0.01, epochs=10, warmup_epochs=2,
                                   steps_per_epoch=5)  # 50 steps, 10 of warm-up

    def at(step):
        return float(rate(step))

    assert at(0) == pytest.approx(0.01 / 25)
    assert at(5) == pytest.approx((0.01 + 0.01 / 25) / 2)  # halfway up, linearly
    assert at(10) == pytest.approx(0.01)  # the peak, at the end of the warm-up
    assert at(30) == pytest.approx(0.005, rel=1e-5)  # halfway down the cosine
    assert at(49) < 0.01 * 0.002 and at(50) == pytest.approx(0.0, abs=1e-12)
    steps = [at(step) for step in range(51)]
    assert steps[:11] == sorted(steps[:11]) and steps[10:] == sorted(steps[10:], reverse=True)
    assert schedules.learning_rate("plateau", 0.002, 10, 2, 5) == 0.002


def test_the_fast_recipe_sets_defaults_that_explicit_flags_and_config_keys_override(tmp_path):
    fast = settings.parse_args(["--recipe", "fast"])
    for name, value in settings.RECIPES["fast"].items():
        assert getattr(fast, name) == value
    assert settings.parse_args([]).schedule == "plateau"  # the blog's, by default
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "fast", "lr": 0.01}))
    mixed = settings.parse_args(["--config", str(config), "--epochs", "7"])
    assert (mixed.recipe, mixed.lr, mixed.epochs, mixed.schedule) == ("fast", 0.01, 7,
                                                                      "onecycle")


def history(output):
    with open(os.path.join(output, "history.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_fast_run_records_its_resolved_settings_and_learning_rates(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    code = train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--recipe", "fast", *TINY_FLAGS,
                       "--epochs", "3", "--lr", "0.002"])
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert (config["recipe"], config["lr"], config["epochs"]) == ("fast", 0.002, 3)
    for name in ("schedule", "optimizer", "weight_decay", "label_smoothing", "warmup_epochs"):
        assert config[name] == settings.RECIPES["fast"][name]
    rates = [float(row["learning_rate"]) for row in history(output)]
    steps = -(-config["train_images"] // 8)
    args = settings.parse_args(["--recipe", "fast", "--epochs", "3", "--lr", "0.002"])
    expected = [float(schedules.learning_rate(args.schedule, args.lr, args.epochs,
                                              args.warmup_epochs, steps)(steps * epoch))
                for epoch in (1, 2, 3)]
    assert rates == pytest.approx(expected, rel=1e-5)
    model = keras.models.load_model(output / artifacts.MODEL_FILE)
    assert type(model.optimizer).__name__ == "AdamW"
    assert model.loss.get_config()["label_smoothing"] == settings.RECIPES["fast"][
        "label_smoothing"]


def start_and_kill_after_epochs(command, backup, epochs):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    marker = backup / "training_metadata.json"
    deadline = time.monotonic() + 300
    while not (marker.exists() and json.loads(marker.read_text())["epoch"] >= epochs):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the epochs did not end in time"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_run_killed_mid_cycle_resumes_on_the_very_same_learning_rates(demo_dataset,
                                                                        tmp_path):
    def command(output):
        return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", demo_dataset,
                "--output", str(output), "--logs", str(tmp_path / "logs"), *TINY_FLAGS[:-4],
                "--recipe", "fast", "--epochs", "6", "--warmup-epochs", "1.5"]

    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    start_and_kill_after_epochs(command(tmp_path / "cut"), tmp_path / "cut" / "backup", 2)
    resumed = subprocess.run(command(tmp_path / "cut"), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-2000:]
    uninterrupted = {row["epoch"]: row["learning_rate"] for row in history(tmp_path / "whole")}
    interrupted = {row["epoch"]: row["learning_rate"] for row in history(tmp_path / "cut")}
    assert sorted(interrupted) == sorted(uninterrupted) == [str(epoch) for epoch in range(6)]
    assert interrupted == uninterrupted


def fingerprint(folder):
    """Every file below folder, with its size and modification time."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            status = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (status.st_size,
                                                                       status.st_mtime_ns)
    return found


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_a_suggestion_and_touches_nothing_else(trained_run,
                                                                            tmp_path, capsys):
    output = tmp_path / "Output"
    (output / "backup").mkdir(parents=True)
    (output / "backup" / "run.json").write_text("{}")  # an interrupted run's backup
    for name in (artifacts.MODEL_FILE, artifacts.LABELS_FILE, artifacts.LABELS_JSON,
                 "config.json", "history.csv", "skipped_files.csv"):
        shutil.copy2(os.path.join(trained_run["output"], name), output / name)
    before = fingerprint(output)
    code = train.main(["--dataset", trained_run["dataset"], "--output", str(output),
                       "--logs", str(tmp_path / "logs"), "--lr-find", "--recipe", "fast",
                       *TINY_FLAGS])
    assert code == 0
    said = capsys.readouterr().out
    suggested = float(said.split("suggested learning rate: --lr ")[1].split()[0])
    assert 1e-7 < suggested < 10  # neither end of the sweep
    assert (output / schedules.PLOT).stat().st_size > 0
    after = fingerprint(output)
    assert {name: after[name] for name in before} == before
    assert not [name for name in set(after) - set(before) if name not in (
        schedules.PLOT, run_folder.LOCK_FILE) and not name.startswith("cache")]


def test_the_range_test_stops_when_the_loss_explodes_and_suggests_below_the_minimum():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[(x[:, 0] > 0).astype(int)]
    test = schedules.range_test(model, ((x, y) for _ in range(1000)), steps=200)
    assert 5 < len(test.rates) <= 200
    assert test.rates == sorted(test.rates) and test.rates[0] == pytest.approx(1e-7)
    skipped = schedules.SKIPPED  # the first steps, where the average is warming up
    lowest = test.rates[skipped + int(np.argmin(test.losses[skipped:]))]
    assert test.suggestion() == pytest.approx(lowest / 10)


def test_tta_is_the_mean_of_the_image_and_its_mirror(trained_run):
    model = keras.models.load_model(os.path.join(trained_run["output"], artifacts.MODEL_FILE))
    paths = images.list_images(trained_run["dataset"])[:5]
    batch = np.stack([images.load_image(path, model.input_shape[1])
                      for path in paths]).astype("float32")
    plain = model.predict(batch, verbose=0)
    mirrored = model.predict(batch[:, :, ::-1], verbose=0)
    np.testing.assert_allclose(inference.probabilities(model, batch, tta=True),
                               (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(inference.probabilities(model, batch), plain, atol=1e-6)


def test_predict_with_tta_prints_the_averaged_probability(trained_run, tmp_path, capsys):
    out = trained_run["output"]
    image = images.list_images(trained_run["dataset"])[0]
    model = keras.models.load_model(os.path.join(out, artifacts.MODEL_FILE))
    batch = images.load_image(image, model.input_shape[1])[None].astype("float32")
    expected = inference.probabilities(model, batch, tta=True)[0]
    code = predict.main(["--image", image, "--model", os.path.join(out, artifacts.MODEL_FILE),
                         "--labels", os.path.join(out, artifacts.LABELS_FILE), "--tta",
                         "--output", str(tmp_path), "--format", "json"])
    assert code == 0
    (prediction,) = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert prediction["probability"] == pytest.approx(float(expected.max()), abs=1e-6)


@pytest.mark.slow
def test_the_test_report_says_whether_tta_was_on(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    assert train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--tta", *TINY_FLAGS[:-4], "--epochs", "1"]) == 0
    page = (output / "report.html").read_text()
    assert "<th>test-time augmentation</th><td>on: each image and its mirror" in page


@pytest.mark.slow
def test_multi_label_trains_with_the_fast_recipe(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    assert train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--multi-label", "--recipe", "fast",
                       *TINY_FLAGS]) == 0
    model = keras.models.load_model(output / artifacts.MODEL_FILE)
    assert type(model.loss).__name__ == "BinaryCrossentropy"
    assert len(history(output)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mix, augment", [("mixup", "generator"), ("cutmix", "randaugment")])
def test_mixup_cutmix_and_randaugment_train(demo_dataset, tmp_path, mix, augment):
    output = tmp_path / "Output"
    assert train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--mix", mix, "--augment", augment,
                       *TINY_FLAGS[:-4], "--epochs", "1"]) == 0
    assert len(history(output)) == 1
