"""Several workers (tf.distribute): processes on 127.0.0.1 train the real model together,
agree with one process, stop together and resume; the input is split between them."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from classifier import artifacts, distributed
from classifier.cli import UserError
from conftest import ROOT, TINY_FLAGS

DRIVER = os.path.join(ROOT, "tests", "distributed_worker.py")
TIMEOUT = 420


def free_addresses(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    addresses = ",".join(f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets)
    for sock in sockets:
        sock.close()
    return addresses


def worker_flags(dataset, work, index, addresses, *extra):
    return ["--dataset", dataset, "--output", str(work / f"out{index}"),
            "--logs", str(work / "logs"), "--run-name", "run", *TINY_FLAGS, *extra,
            *(["--worker-addresses", addresses, "--worker-index", str(index)] if addresses
              else [])]


def start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(processes):
    """Wait for every process; kill those still running at the deadline (TensorFlow's
    multi-worker runtime takes SIGTERM for a preemption notice, not an order to stop)."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append((process.returncode, out, err))
    return results


def driver(state, flags, *options):
    return start([sys.executable, DRIVER, str(state), *options, "--", *flags])


def load_state(path):
    with np.load(path) as state:
        return [state[name] for name in state.files]


def history_epochs(output):
    with open(os.path.join(output, "history.csv"), newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--recipe", "blog"], ["--recipe", "fast"],
                                   ["--model", "mobilenet_v3_small", "--weights", "none"]])
def test_two_workers_train_the_same_weights_and_the_chief_writes_the_model(demo_dataset,
                                                                          tmp_path, flags):
    addresses = free_addresses(2)
    results = finish([driver(tmp_path / f"state{index}.npz",
                             worker_flags(demo_dataset, tmp_path, index, addresses, *flags))
                      for index in range(2)])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    chief, other = load_state(tmp_path / "state0.npz"), load_state(tmp_path / "state1.npz")
    assert len(chief) == len(other) > 60  # weights, BatchNorm statistics, Adam's moments
    for mine, theirs in zip(chief, other):
        np.testing.assert_array_equal(mine, theirs)
    assert history_epochs(tmp_path / "out0") == [0, 1]
    assert sorted(os.listdir(tmp_path / "out1")) == ["cache"], "only the chief writes files"
    assert os.listdir(tmp_path / "logs") == ["run"]
    model = artifacts.load_model(artifacts.model_path(None, str(tmp_path / "out0" /
                                                               artifacts.LABELS_FILE)))
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    probabilities = model.predict(pixels, verbose=0)
    assert probabilities.shape == (3, 8)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_another_network_mirrored_over_two_devices_is_refused_in_one_line(demo_dataset,
                                                                        tmp_path):
    [(code, _, err)] = finish([driver(tmp_path / "state.npz", worker_flags(
        demo_dataset, tmp_path, 0, None, "--model", "mobilenet_v3_small", "--weights", "none",
        "--devices", "CPU:0,CPU:1"), "--logical-cpus", "2")])
    assert code == 2 and "Traceback" not in err
    assert "mobilenet_v3_small trains on one device per machine" in err


def test_pretrained_weights_on_several_workers_are_refused_before_loading(tmp_path, caplog,
                                                                          monkeypatch):
    monkeypatch.setattr(distributed, "kind", lambda strategy: "multi-worker")
    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"")
    code = train.main(["--dataset", str(tmp_path / "none"), "--model", "vgg16", "--weights",
                       str(weights), "--output", str(tmp_path / "out")])
    assert code == 2 and "runs on one machine" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_step_on_two_workers_or_two_devices_is_one_step_of_one_process(demo_dataset,
                                                                           tmp_path):
    addresses = free_addresses(2)
    weighted = ["--class-weight", "balanced"]
    processes = [driver(tmp_path / "alone.npz", worker_flags(
                     demo_dataset, tmp_path / "alone", 0, None, *weighted), "--one-step"),
                 driver(tmp_path / "mirrored.npz", worker_flags(
                     demo_dataset, tmp_path / "mirrored", 0, None, *weighted,
                     "--devices", "CPU:0,CPU:1"), "--one-step", "--logical-cpus", "2")]
    processes += [driver(tmp_path / f"worker{index}.npz", worker_flags(
                      demo_dataset, tmp_path / "workers", index, addresses, *weighted),
                      "--one-step") for index in range(2)]
    results = finish(processes)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "mirrored over 2 devices" in results[1][2]
    alone = load_state(tmp_path / "alone.npz")
    assert [value for value in alone if value.dtype == np.int64] == [1], "one Adam step"
    for name in ("mirrored", "worker0", "worker1"):
        for expected, value in zip(alone, load_state(tmp_path / f"{name}.npz")):
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_and_both_resume(demo_dataset, tmp_path):
    addresses = free_addresses(2)
    # Multi-label, so that the loop also runs with the sigmoid outputs' loss and metric.
    commands = [[sys.executable, os.path.join(ROOT, "train.py"),
                 *worker_flags(demo_dataset, tmp_path, index, addresses, "--augment", "layers",
                               "--multi-label")]
                for index in range(2)]
    chief, other = start(commands[0]), start(commands[1])
    marker = tmp_path / "out0" / "backup" / "training_metadata.json"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert chief.poll() is None and other.poll() is None, "a worker stopped too early"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    other.kill()
    # The chief must stop by itself (finish() kills it at the generous deadline: code -9).
    (code, _, err), _ = finish([chief, other])
    assert code == 4, err[-3000:]
    assert "lost contact with another worker" in err and "Traceback" not in err
    backed_up = json.loads(marker.read_text())["epoch"]

    results = finish([start(command) for command in commands])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    chief_out = results[0][1]
    assert backed_up == 1
    assert "after epoch 1" in results[0][2]
    assert "resuming after epoch 1, from the chief's backup" in results[1][2]
    assert history_epochs(tmp_path / "out0") == [0, 1]
    assert not (tmp_path / "out0" / "backup").exists()
    report = json.loads((tmp_path / "out0" / "classification_report.json").read_text())
    assert f"test exact-match accuracy: {report['exact_match_accuracy']:.2f}" in chief_out


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_all_of_them_gracefully_and_they_resume(demo_dataset,
                                                                            tmp_path):
    addresses = free_addresses(2)

    def commands(epochs):
        return [[sys.executable, os.path.join(ROOT, "train.py"), *worker_flags(
            demo_dataset, tmp_path, index, addresses, "--epochs", str(epochs))]
                for index in range(2)]

    workers = [start(command) for command in commands(30)]
    marker = tmp_path / "out0" / "backup" / "training_metadata.json"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert all(worker.poll() is None for worker in workers), "a worker stopped too early"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGTERM)  # what a scheduler sends one machine
    for code, _, err in finish(workers):
        assert code == 143, err[-3000:]
        assert "run the same command again to resume" in err and "Traceback" not in err
    assert (tmp_path / "out0" / artifacts.MODEL_FILE).exists()
    done = json.loads(marker.read_text())["epoch"]
    resumed = finish([start(command) for command in commands(done + 1)])
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    assert f"after epoch {done}" in resumed[0][2]
    assert sorted(set(history_epochs(tmp_path / "out0"))) == list(range(done + 1))


@pytest.mark.slow
def test_workers_with_other_settings_stop_together_with_one_clear_error(demo_dataset,
                                                                        tmp_path):
    addresses = free_addresses(2)
    results = finish([start([sys.executable, os.path.join(ROOT, "train.py"),
                             *worker_flags(demo_dataset, tmp_path, index, addresses,
                                           "--epochs", str(2 + index))])
                      for index in range(2)])
    for code, _, err in results:
        assert code == 2, err[-3000:]
        assert "the workers disagree on the epochs" in err and "Traceback" not in err
    assert not (tmp_path / "out0" / "history.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (["--worker-index", "1"], "--worker-index goes with --worker-addresses"),
    (["--worker-addresses", "127.0.0.1:1,127.0.0.1:2", "--worker-index", "2"],
     "0 to 1"),
    (["--worker-addresses", "127.0.0.1:1"], "--worker-index must be"),
    (["--strategy", "multi-worker"], "needs TF_CONFIG"),
    (["--strategy", "multi-worker", "--devices", "GPU:0"], "--devices is for"),
])
def test_cluster_mistakes_are_one_line_errors(tmp_path, caplog, monkeypatch, flags, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert train.main(["--output", str(tmp_path / "out"), *flags]) == 2
    assert message in caplog.text


def test_tf_config_and_worker_addresses_together_are_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(UserError, match="use one of them"):
        distributed.cluster_from_flags("127.0.0.1:1", 0)
