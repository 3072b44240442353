"""`tensorboard --logdir ./logs` shows loss, accuracy and learning rate for train and validation."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def tensorboard_server(trained_run):
    executable = shutil.which("tensorboard", path=os.path.dirname(sys.executable))
    assert executable, "tensorboard must be installed with the requirements"
    port = free_port()
    server = subprocess.Popen([executable, "--logdir", trained_run["logs"], "--host",
                               "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # generous: a loaded machine starts it slowly
        while True:
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
                if len(tags) >= 2:
                    break
            except OSError:
                pass
            assert server.poll() is None, "tensorboard exited"
            assert time.monotonic() < deadline, "tensorboard did not serve the run in time"
            time.sleep(1)
        yield base, tags
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_scalars_for_train_and_validation_are_served(trained_run, tensorboard_server):
    base, tags = tensorboard_server
    run = trained_run["run"]
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(tags[f"{run}/train"])
    assert {"epoch_loss", "epoch_accuracy"} <= set(tags[f"{run}/validation"])
    for run_name, tag in ((f"{run}/train", "epoch_loss"),
                          (f"{run}/validation", "epoch_accuracy"),
                          (f"{run}/train", "epoch_learning_rate")):
        query = urllib.parse.urlencode({"run": run_name, "tag": tag})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [step for _, step, _ in points] == [0, 1], (run_name, tag)
    query = urllib.parse.urlencode({"run": f"{run}/train", "tag": "epoch_learning_rate"})
    learning_rates = [value for _, _, value in get_json(
        f"{base}/data/plugin/scalars/scalars?{query}")]
    assert learning_rates == pytest.approx([0.0007, 0.0007])
