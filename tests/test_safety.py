"""Used carelessly: two runs on one output folder, SIGTERM, a signal at any moment, two runs
sharing a cache, class folders that are symbolic links."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from classifier import images
from conftest import ROOT, TINY_FLAGS, write_image

SIGNAL_AT = os.path.join(ROOT, "tests", "signal_at.py")
DEADLINE = 300  # seconds: generous, for a loaded machine; the tests wait on events


def train_command(dataset, output, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", dataset,
            "--output", str(output), "--logs", str(output) + "-logs", *TINY_FLAGS[:-4],
            *extra]


def start(command):
    # A shell that started us in the background may have set SIGINT to "ignore", and a child
    # would inherit that: give the child Ctrl-C back, as in a terminal.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process, what):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert process.poll() is None, (what, process.communicate())
        assert time.monotonic() < deadline, f"waited too long for {what}"
        time.sleep(0.2)


def history_epochs(output):
    with open(os.path.join(output, "history.csv"), newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_and_the_first_is_untouched(
        demo_dataset, tmp_path):
    output = tmp_path / "Output"
    first = start(train_command(demo_dataset, output, "--epochs", "6"))
    wait_for(lambda: (output / "backup" / "training_metadata.json").exists(), first,
             "the first run's first epoch")
    first.send_signal(signal.SIGSTOP)  # held mid-run, however fast the machine, until the
    try:                               # second has tried
        second = subprocess.run(train_command(demo_dataset, output, "--epochs", "6"),
                                capture_output=True, text=True, timeout=DEADLINE)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"pid {first.pid}, started" in errors[0], second.stderr
    assert "Traceback" not in second.stderr
    out, err = first.communicate(timeout=DEADLINE)
    assert first.returncode == 0, err[-2000:]
    assert history_epochs(output) == [0, 1, 2, 3, 4, 5]
    assert json.loads((output / "config.json").read_text())["epochs"] == 6
    assert (output / "vgg_model.keras").exists() and not (output / "backup").exists()


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_same_command_resumes(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    command = train_command(demo_dataset, output, "--epochs", "30")
    running = start(command)
    marker = output / "backup" / "training_metadata.json"
    wait_for(marker.exists, running, "the first epoch")
    running.send_signal(signal.SIGTERM)  # during epoch 2 (or later)
    out, err = running.communicate(timeout=DEADLINE)
    assert running.returncode == 143, err[-2000:]
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert (output / "vgg_model.keras").exists() and (output / "report.html").exists()
    done = json.loads(marker.read_text())["epoch"]
    resumed = subprocess.run(command[:-2] + ["--epochs", str(done + 2)], capture_output=True,
                             text=True, timeout=DEADLINE)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after epoch {done}" in resumed.stderr
    assert sorted(set(history_epochs(output))) == list(range(done + 2))


@pytest.mark.slow
@pytest.mark.parametrize("moment, name, code", [
    ("classifier.images:load_image_and_size", "SIGTERM", 143),  # while decoding
    ("os:pwrite", "SIGINT", 130),  # while writing the cache
    ("classifier.reports:save_confusion_matrix", "SIGTERM", 143),  # while writing reports
])
def test_a_signal_at_any_moment_stops_without_a_traceback(demo_dataset, tmp_path, moment,
                                                          name, code):
    output = tmp_path / "Output"
    process = start([sys.executable, SIGNAL_AT, moment, name, "--",
                     *train_command(demo_dataset, output, "--epochs", "1")[2:]])
    out, err = process.communicate(timeout=DEADLINE)
    assert process.returncode == code, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err
    # The cache is whole or absent: no data file without the index that names it.
    cache = output / "cache"
    data = [name for name in os.listdir(cache) if name.endswith(".npy")]
    indexes = [name for name in os.listdir(cache) if name.endswith("px.json")]
    assert data == [json.loads((cache / index).read_text())["data"] for index in indexes]


def process_state(process):
    with open(f"/proc/{process.pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_two_runs_sharing_a_cache_both_finish_and_leave_it_valid(demo_dataset, tmp_path):
    cache = tmp_path / "cache"
    # The first stops itself while it writes the cache, holding its turn on it.
    first = start([sys.executable, SIGNAL_AT, "os:pwrite", "SIGSTOP", "--",
                   *train_command(demo_dataset, tmp_path / "run0", "--epochs", "1",
                                  "--cache-dir", str(cache))[2:]])
    wait_for(lambda: process_state(first) == "T", first, "the first run to hold the cache")
    second = start(train_command(demo_dataset, tmp_path / "run1", "--epochs", "1",
                                 "--cache-dir", str(cache)))
    said = []
    reader = threading.Thread(target=lambda: said.extend(second.stderr), daemon=True)
    reader.start()
    wait_for(lambda: any("waiting for another run to finish with the cache" in line
                         for line in said), second, "the second run to wait for its turn")
    first.send_signal(signal.SIGCONT)
    for run in (first, second):
        run.wait(timeout=DEADLINE)
        assert run.returncode == 0, (run.stderr.read() if run is first else "".join(said))[-2000:]
    third = subprocess.run(train_command(demo_dataset, tmp_path / "run2", "--epochs", "1",
                                         "--cache-dir", str(cache)),
                           capture_output=True, text=True, timeout=DEADLINE)
    assert third.returncode == 0 and "all 96 images from the cache" in third.stderr
    assert len([name for name in os.listdir(cache) if name.endswith(".npy")]) == 1


def test_class_folders_that_are_symbolic_links_are_followed_each_real_folder_once(tmp_path):
    photos = tmp_path / "photos"
    red = write_image(photos / "red" / "a.png", np.full((8, 8, 3), 200))
    write_image(photos / "blue" / "b.png", np.full((8, 8, 3), 50))
    dataset = tmp_path / "Dataset"
    dataset.mkdir()
    os.symlink(photos / "red", dataset / "red_shoes")
    os.symlink(photos / "red", dataset / "zz_red_again")  # the same folder: listed once
    os.symlink(photos / "blue", dataset / "blue_shoes")
    os.symlink(dataset, photos / "red" / "loop")  # a loop back to the dataset
    found = [os.path.relpath(path, dataset) for path in images.list_images(str(dataset))]
    assert found == [os.path.join("blue_shoes", "b.png"), os.path.join("red_shoes", "a.png")]
    assert [images.label_of(os.path.join(dataset, path), str(dataset)) for path in found] == [
        "blue_shoes", "red_shoes"]
    assert os.path.realpath(dataset / found[1]) == os.path.realpath(red)
