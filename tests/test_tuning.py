"""--tune: the search over settings on the validation part, its files, and the final run."""

import csv
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import export
import predict
import train
from classifier import (augmentation, images, networks, pipelines, run_folder,
                        search_space, settings, tuning, tuning_report)
from classifier.cli import UserError
from conftest import ROOT, TINY_FLAGS
from test_export import run_onnx


class FakeModel:
    stop_training = False


def scripted_trial(score_of, interrupt_at=None):
    """A train_trial that trains nothing: each epoch scores score_of(settings, epoch), through
    the search's callback as Keras would call it; KeyboardInterrupt in trial interrupt_at."""
    seen = []

    def train_trial(settings_, callback):
        seen.append(settings_)
        if len(seen) - 1 == interrupt_at:
            raise KeyboardInterrupt
        model = FakeModel()
        callback.set_model(model)
        for epoch in range(EPOCHS):
            callback.on_train_batch_end(0)
            callback.on_epoch_end(epoch, {"val_accuracy": score_of(settings_, epoch)})
            if model.stop_training:
                return
    return train_trial, seen


EPOCHS = 9
SPACE = search_space.Space(lr=(1e-4, 1e-2), label_smoothing=(0.0, 0.2),
                     augmentation=("none", "light", "blog"), image_size=(32, 48),
                     network=("vgg",))
FIRST = {"network": "vgg", "image_size": 32, "lr": 7e-4, "augmentation": "blog",
         "label_smoothing": 0.0}


def closeness_to_a_best_lr(settings_, epoch):
    """Better the nearer lr is to 3e-3, and the more epochs."""
    return 1 - abs(np.log10(settings_["lr"] / 3e-3)) / 3 - 0.1 / (epoch + 1)


def run_search(folder, train_trial, max_trials=12, print_="the same search", **options):
    return tuning.search(train_trial, lambda: SPACE, lambda space: FIRST, str(folder),
                         budget_minutes=10, max_trials=max_trials, seed=1, epochs=EPOCHS,
                         monitor="val_accuracy", print_=print_, **options)


def test_the_search_runs_the_recipe_first_stops_poor_trials_and_picks_the_best(tmp_path):
    train_trial, seen = scripted_trial(closeness_to_a_best_lr)
    search = run_search(tmp_path, train_trial)
    assert seen[0] == FIRST, "the first trial is the recipe's own settings"
    assert len(search.trials) == 12
    states = [trial["state"] for trial in search.trials]
    assert "pruned" in states and "complete" in states
    pruned = [trial for trial in search.trials if trial["state"] == "pruned"]
    assert all(trial["epochs"] < EPOCHS for trial in pruned)
    assert all(trial["epochs"] >= 3 for trial in pruned), "no verdict before a quarter of them"
    complete = [trial for trial in search.trials if trial["state"] == "complete"]
    assert search.chosen["score"] == max(trial["score"] for trial in complete)
    assert search.chosen["state"] == "complete"
    assert search.config()["baseline_score"] == pytest.approx(closeness_to_a_best_lr(FIRST, 8))
    assert search.baseline is search.trials[0]
    assert {settings_["image_size"] for settings_ in seen} == {32, 48}


def test_an_interrupted_search_continues_where_it_stopped(tmp_path):
    train_trial, seen = scripted_trial(closeness_to_a_best_lr, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(tmp_path, train_trial, max_trials=8)
    assert len(seen) == 3
    again, seen_again = scripted_trial(closeness_to_a_best_lr)
    search = run_search(tmp_path, again, max_trials=8)
    assert seen_again[0] == seen[2], "the interrupted trial runs again first, as it was"
    assert len(seen_again) == 6, "only the trials not done yet run"
    finished = [trial for trial in search.trials if trial["state"] != "interrupted"]
    assert [trial["settings"] for trial in finished[:2]] == seen[:2]
    assert len(finished) == 8
    drawn = [json.dumps(trial["settings"], sort_keys=True) for trial in finished]
    assert len(set(drawn)) == 8, "a resumed search does not draw the same settings again"
    assert [trial["state"] for trial in search.trials].count("interrupted") == 1
    # A finished search is read back, not run again.
    third, seen_third = scripted_trial(closeness_to_a_best_lr)
    assert run_search(tmp_path, third, max_trials=20).chosen == search.chosen
    assert seen_third == []


def test_a_trial_left_running_by_a_kill_runs_again_with_its_settings(tmp_path):
    study = tuning.open_study(str(tmp_path), False, 1, EPOCHS, "the same search")
    study.set_user_attr("space", dataclasses.asdict(SPACE))
    study.enqueue_trial({key: FIRST[key] for key in SPACE.searched()},
                        user_attrs={"baseline": True})
    killed = study.ask()  # as a process killed in its first trial leaves it: running
    killed.set_user_attr("settings", SPACE.suggest(killed))
    train_trial, seen = scripted_trial(closeness_to_a_best_lr)
    search = run_search(tmp_path, train_trial, max_trials=3)
    assert seen[0] == FIRST
    assert [trial["state"] for trial in search.trials][0] == "interrupted"
    assert search.baseline["state"] == "complete" and search.baseline["settings"] == FIRST
    assert len([trial for trial in search.trials if trial["state"] != "interrupted"]) == 3


def test_another_search_in_the_same_folder_is_refused_and_fresh_starts_over(tmp_path):
    train_trial, _ = scripted_trial(closeness_to_a_best_lr)
    run_search(tmp_path, train_trial, max_trials=2)
    with pytest.raises(UserError, match="--fresh"):
        run_search(tmp_path, train_trial, max_trials=2, print_="another search")
    again, seen = scripted_trial(closeness_to_a_best_lr)
    run_search(tmp_path, again, max_trials=3, fresh=True)
    assert len(seen) == 3 and seen[0] == FIRST


def test_a_trial_past_the_deadline_is_stopped():
    callback = tuning.Trial(trial=None, monitor="val_accuracy", deadline=0, on_epoch=None,
                            epochs=EPOCHS)
    model = FakeModel()
    callback.set_model(model)
    callback.on_train_batch_end(0)
    assert model.stop_training and callback.stopped == "out of time"


def parse(*flags):
    return settings.parse_args(["--dataset", "d", *flags])


def test_without_tune_nothing_changes():
    plain = parse()
    assert not hasattr(plain, "tune_fixed") and plain.val_size == 0 and plain.tune is None
    assert plain.tune_trials == 0


def test_flags_given_stay_fixed_and_the_rest_is_searched_around_the_recipe():
    args = parse("--tune", "5", "--recipe", "fast", "--lr", "0.002", "--image-size", "64")
    assert args.val_size == settings.TUNE_VAL_SIZE, "a validation part to score on"
    space = search_space.space(base_of(args), set(args.tune_fixed), ["mobilenet_v3_small"],
                         stream=False)
    assert space.lr == (0.002,) and space.image_size == (64,)
    assert space.network == ("vgg", "mobilenet_v3_small")
    assert space.label_smoothing == search_space.LABEL_SMOOTHING
    assert set(space.augmentation) == set(augmentation.STRENGTHS)
    first = search_space.baseline(base_of(args), space)
    assert first == {"network": "vgg", "image_size": 64, "lr": 0.002, "augmentation": "light",
                     "label_smoothing": 0.1}
    free = parse("--tune", "5", "--zoom-range", "0.3", "--model", "vgg16")
    free_space = search_space.space(base_of(free), set(free.tune_fixed), ["mobilenet_v3_small"],
                              stream=False)
    assert free_space.augmentation == (search_space.GIVEN,) and free_space.network == ("vgg16",)
    assert min(free_space.image_size) >= 32 and 96 in free_space.image_size
    chosen = search_space.settings_of({"network": "mobilenet_v3_small", "image_size": 48,
                                 "lr": 0.01, "augmentation": "none", "label_smoothing": 0.05},
                                set(args.tune_fixed))
    assert chosen["weights"] == "imagenet" and chosen["fine_tune_lr"] == pytest.approx(0.001)
    assert chosen["rotation_range"] == chosen["zoom_range"] == 0
    small = parse("--tune", "5", "--image-size", "24")
    assert search_space.space(base_of(small), set(), ["mobilenet_v3_small"], False).network == \
        ("vgg",), "a network that cannot take the size is left out"


def base_of(args):
    return search_space.Base(args.model, args.image_size, args.lr, args.label_smoothing,
                       {key: getattr(args, key) for key in augmentation.BLOG})


@pytest.mark.parametrize("flags, message", [
    (["--tune", "5", "--lr-find"], "drop --lr-find"),
    (["--tune", "5", "--check-only"], "drop --check-only"),
    (["--tune", "0"], "--tune must be"),
    (["--tune-trials", "3"], "add --tune")])
def test_tune_refuses_what_cannot_go_with_it(flags, message):
    with pytest.raises(UserError, match=message):
        parse(*flags)


def test_a_budget_too_small_for_one_trial_is_refused_before_any_image_is_loaded(
        demo_dataset, tmp_path, caplog, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("images were loaded")

    monkeypatch.setattr(train.dataset, "load_folders", no_loading)
    code = train.main(["--dataset", demo_dataset, "--output", str(tmp_path / "Output"),
                       "--logs", str(tmp_path / "logs"), *TINY_FLAGS[:-4], "--epochs", "50",
                       "--tune", "0.001"])
    assert code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "--tune 0.001: one trial of 50 epochs takes about" in errors[0]


def test_two_searches_cannot_share_an_output_folder(demo_dataset, tmp_path, caplog):
    output = str(tmp_path / "Output")
    with run_folder.output_lock(output):
        code = train.main(["--dataset", demo_dataset, "--output", output, "--tune", "5",
                           *TINY_FLAGS])
    assert code == 2
    assert "is in use by another training run" in caplog.text


def image_hashes(x):
    return {hashlib.blake2b(np.ascontiguousarray(image).tobytes()).hexdigest() for image in x}


@pytest.mark.slow
def test_a_search_then_the_final_run_leaves_a_normal_runs_files_and_never_reads_the_test_part(
        demo_dataset, trained_run, tmp_path, monkeypatch):
    """Every batch any model sees during the search is recorded: none holds a test image."""
    fed, searching = [], []
    for name in ("training_batches", "batches"):
        original = getattr(pipelines, name)

        def recording(x, *args, _original=original, **kwargs):
            fed.append((bool(searching), image_hashes(np.asarray(x))))
            return _original(x, *args, **kwargs)
        monkeypatch.setattr(pipelines, name, recording)
    real_search = tuning.search

    def marked_search(*args, **kwargs):
        searching.append(True)
        try:
            return real_search(*args, **kwargs)
        finally:
            searching.clear()
    monkeypatch.setattr(tuning, "search", marked_search)

    output = tmp_path / "Output"
    flags = ["--dataset", demo_dataset, "--output", str(output), "--logs",
             str(tmp_path / "logs"), "--batch-size", "8", "--epochs", "3", "--workers", "2",
             "--tune", "10", "--tune-trials", "4", "--model", "vgg"]
    assert train.main(flags) == 0

    with open(output / "split.csv", newline="") as handle:
        parts = {}
        for row in csv.DictReader(handle):
            parts.setdefault(row["part"], []).append(row["path"])
    assert set(parts) == {"train", "validation", "test"}
    config = json.load(open(output / "config.json"))
    sizes = {32, 48, 64, 96} | {config["image_size"]}
    def at_every_size(part):  # as any trial, whatever its size, would see them
        return set().union(*(image_hashes(np.stack([images.load_image(path, size)
                                                    for path in parts[part]]))
                             for size in sizes))

    test_images, validation_images = at_every_size("test"), at_every_size("validation")
    during = [hashes for in_search, hashes in fed if in_search]
    assert during, "the search trained models"
    assert all(not (hashes & test_images) for hashes in during), "the search read test images"
    assert sum(hashes <= validation_images for hashes in during) >= 4, \
        "each trial's validation batches are recognised, whatever their size"
    assert any(hashes & test_images for in_search, hashes in fed if not in_search), \
        "the final evaluation reads the test part (the recording sees it)"

    with open(output / tuning_report.CSV, newline="") as handle:
        trials = list(csv.DictReader(handle))
    assert len(trials) == 4
    chosen = [trial for trial in trials if trial["chosen"] == "yes"]
    assert len(chosen) == 1
    complete = [float(trial["validation_score"]) for trial in trials
                if trial["state"] == "complete"]
    assert float(chosen[0]["validation_score"]) == max(complete)
    assert config["tuning"]["chosen"]["number"] == int(chosen[0]["trial"])
    assert config["lr"] == pytest.approx(float(chosen[0]["lr"]), rel=1e-5)
    assert config["image_size"] == int(chosen[0]["image_size"])
    assert json.load(open(output / "labels.json"))["image_size"] == config["image_size"]

    # Its files: other tests add folders of their own into that run's output.
    normal = {name for name in os.listdir(trained_run["output"])
              if os.path.isfile(os.path.join(trained_run["output"], name))}
    assert normal <= set(os.listdir(output))
    assert {tuning_report.CSV, tuning_report.PLOT} <= set(os.listdir(output))
    page = (output / "report.html").read_text()
    assert "Search (--tune)" in page and tuning_report.PLOT in page
    assert f"trial {config['tuning']['chosen']['number']} of 4 chosen" in page

    image = parts["test"][0]
    assert predict.main(["--image", image, "--model", str(output / "vgg_model.keras"),
                         "--labels", str(output / "labels.pickle")]) == 0

    # An export takes the images at the size the search chose, and answers as the model does.
    target = str(tmp_path / "exported.onnx")
    assert export.main(["--format", "onnx", "--labels", str(output / "labels.pickle"),
                        "--output", target]) == 0
    pixels = np.stack([images.load_image(path, config["image_size"])
                       for path in parts["test"][:3]]).astype("float32")
    model = networks.with_dtype_policy(
        keras.saving.load_model(str(output / "vgg_model.keras")), "float32")
    np.testing.assert_allclose(run_onnx(target, pixels), model.predict(pixels, verbose=0),
                               atol=1e-4)


@pytest.mark.slow
def test_a_killed_search_resumes_and_so_does_its_final_run(demo_dataset, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", demo_dataset,
           "--output", str(tmp_path / "Output"), "--logs", str(tmp_path / "logs"),
           *TINY_FLAGS[:-4], "--epochs", "3", "--tune", "10", "--tune-trials", "4"]

    def start_and_kill_9_after(last_line):
        """kill -9 once it has said last_line (a prefix); the trial lines it said."""
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        said = []
        for line in process.stdout:
            if line.startswith("INFO tuning: trial "):
                said.append(line)
            if line.startswith(last_line):
                process.kill()
                break
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL, "killed before it ended"
        return said

    said = start_and_kill_9_after("INFO tuning: trial 1 (")
    assert len(said) == 2
    # The search finishes, then its final run is killed after its first epoch.
    said_again = start_and_kill_9_after("Epoch 2/3")
    assert "trial 0 (" not in "".join(said_again), "the trials done are not run again"
    with open(tmp_path / "Output" / tuning_report.CSV, newline="") as handle:
        trials = [row for row in csv.DictReader(handle) if row["state"] != "interrupted"]
    assert len(trials) == 4, "four trials in all, not four more"
    # Each trial done before the kill is kept, or, when the kill came before Optuna stored
    # its end, run again with the same settings.
    kept = {search_space.describe({**row, "lr": float(row["lr"]),
                             "label_smoothing": float(row["label_smoothing"])})
            for row in trials}
    assert all(re.search(r"trial \d+ \((.*)\): ", line).group(1) in kept for line in said)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "INFO tuning: trial " not in result.stderr, "the search is read back"
    assert "resuming the interrupted run" in result.stderr
    assert (tmp_path / "Output" / "vgg_model.keras").exists()


@pytest.mark.slow
def test_a_network_whose_imagenet_weights_are_at_hand_is_searched_with_them(
        demo_dataset, tmp_path, monkeypatch):
    from test_networks import backbone_file
    name = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    backbone_file("mobilenet_v3_small", tmp_path / "keras" / "models" / name)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(networks, "_reachable", lambda url: False)  # the others: not at hand
    output = tmp_path / "Output"
    # Everything else given: the search is over the network alone.
    assert train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), *TINY_FLAGS, "--lr", "0.001",
                       "--label-smoothing", "0", "--zoom-range", "0.1", "--head-epochs", "1",
                       "--tune", "10", "--tune-trials", "3"]) == 0
    with open(output / tuning_report.CSV, newline="") as handle:
        trials = list(csv.DictReader(handle))
    assert {trial["network"] for trial in trials} == {"vgg", "mobilenet_v3_small"}
    chosen = next(trial["network"] for trial in trials if trial["chosen"] == "yes")
    config = json.load(open(output / "config.json"))
    assert config["tuning"]["searched"] == {"network": ["vgg", "mobilenet_v3_small"]}
    assert config["model"] == chosen
    assert config["weights"] == ("imagenet" if chosen != "vgg" else "none")
    assert json.load(open(output / "labels.json"))["network"] == chosen
    assert (output / f"{chosen}_model.keras").exists()
