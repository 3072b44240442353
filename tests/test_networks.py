"""Every network behind one contract (raw RGB pixels in, float32 probabilities out, saved,
loaded, predicted and exported alike), their weights (--weights), starting from an earlier
model (--init-from), and fine-tuning in two phases that resume where they stopped."""

import csv
import json
import os
import time

import cv2
import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

import export
import predict
import train
from classifier import artifacts, calibration, hardware, images, networks, run_folder
from conftest import TINY_FLAGS
from test_export import run_onnx, run_savedmodel, run_tflite

NETWORKS = list(networks.REGISTRY)


def tiny_run(dataset, work, *extra):
    return ["--dataset", dataset, "--output", str(work / "Output"), "--logs",
            str(work / "logs"), *TINY_FLAGS, *extra]


def write_keras_weights(model, path):
    """A weights file in the format of Keras's published ImageNet files (HDF5, by layer)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return str(path)


def backbone_file(name, path, seed=1):
    keras.utils.set_random_seed(seed)
    constructor = {"mobilenet_v3_small": keras.applications.MobileNetV3Small,
                   "vgg16": keras.applications.VGG16}[name]
    base = constructor(include_top=False, weights=None, input_shape=(32, 32, 3))
    return write_keras_weights(base, path), base


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_takes_raw_pixels_and_gives_float32_probabilities(name):
    with hardware.dtype_policy("mixed_bfloat16"):
        model = networks.create(name, (32, 32, 3), 5)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    probabilities = model.predict(pixels, verbose=0)
    assert model.input_shape == (None, 32, 32, 3) and probabilities.shape == (3, 5)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("logits").units == 5 and model.name == name
    sigmoid = networks.create(name, (32, 32, 3), 5, multi_label=True)
    assert sigmoid.get_layer("probabilities").activation.__name__ == "sigmoid"


@pytest.mark.parametrize("name, size", [("vgg", 15), ("vgg16", 31), ("mobilenet_v3_small", 16)])
def test_a_size_the_network_cannot_take_is_refused_before_loading(name, size, tmp_path, caplog):
    code = train.main(["--dataset", str(tmp_path / "nothing"), "--model", name,
                       "--image-size", str(size), "--output", str(tmp_path / "Output")])
    assert code == 2
    assert "--image-size must be at least" in caplog.text
    assert "dataset folder not found" not in caplog.text and not (tmp_path / "Output").exists()


def test_imagenet_weights_offline_and_not_cached_is_one_line_at_once(demo_dataset, tmp_path,
                                                                       monkeypatch, caplog):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(networks, "_reachable", lambda url: False)  # no network
    started = time.monotonic()
    code = train.main(tiny_run(demo_dataset, tmp_path, "--model", "mobilenet_v3_small"))
    assert code == 2 and time.monotonic() - started < 10
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" in errors[0].message
    assert str(tmp_path / "keras" / "models") in errors[0].message
    assert not (tmp_path / "Output").exists()


def test_a_host_that_does_not_answer_is_not_reachable():
    assert not networks._reachable("https://127.0.0.1:9/weights.h5")


def test_vgg_has_no_imagenet_weights_and_paths_must_exist(tmp_path):
    with pytest.raises(networks.UserError, match="no ImageNet weights"):
        networks.resolve_weights("vgg", "imagenet")
    with pytest.raises(networks.UserError, match="no such file"):
        networks.resolve_weights("vgg16", str(tmp_path / "missing.h5"))
    assert networks.resolve_weights("vgg16", "none") is None


def test_vgg16_reads_imagenet_weights_as_keras_preprocesses_for_them(tmp_path):
    path, base = backbone_file("vgg16", tmp_path / "vgg16.h5")
    model = networks.create("vgg16", (32, 32, 3), 3, weights=path)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = base(keras.applications.vgg16.preprocess_input(pixels.copy()))
    features = keras.Model(model.input, model.get_layer("block5_pool").output)(pixels)
    np.testing.assert_allclose(np.asarray(features), np.asarray(expected), rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["imagenet", "path"])
def test_head_phase_trains_the_output_layer_on_the_weights_file_frozen(
        demo_dataset, tmp_path, monkeypatch, weights):
    """The cached ImageNet file, or --weights PATH: the backbone starts from it, and the first
    phase leaves it, BatchNormalization statistics included, exactly as the file has it."""
    name = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    cached = tmp_path / "keras" / "models" / name
    path, base = backbone_file("mobilenet_v3_small", cached if weights == "imagenet"
                               else tmp_path / "mine.h5")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(networks, "_reachable", lambda url: False)
    flag = "imagenet" if weights == "imagenet" else path
    code = train.main(tiny_run(demo_dataset, tmp_path, "--model", "mobilenet_v3_small",
                               "--weights", flag, "--epochs", "1", "--head-epochs", "1"))
    assert code == 0
    output = tmp_path / "Output"
    model = artifacts.load_model(str(output / "mobilenet_v3_small_model.keras"))
    for layer in (layer for layer in base.layers if layer.weights):
        for trained, original in zip(model.get_layer(layer.name).weights, layer.weights):
            np.testing.assert_array_equal(trained.numpy(), original.numpy(), err_msg=layer.name)
    info = json.loads((output / "labels.json").read_text())
    assert info["network"] == "mobilenet_v3_small" and info["started_from"] == flag


@pytest.mark.slow
# vgg's own end-to-end tests (test_train, test_predict, test_export, test_multilabel) cover it.
@pytest.mark.parametrize("name", [name for name in NETWORKS if name != networks.DEFAULT])
def test_every_network_trains_saves_predicts_and_exports_alike(name, demo_dataset, tmp_path,
                                                               capsys):
    code = train.main(tiny_run(demo_dataset, tmp_path, "--model", name, "--weights", "none",
                               "--epochs", "1", "--multi-label", "--val-size", "0.2"))
    assert code == 0
    output = tmp_path / "Output"
    model_file = output / artifacts.model_file(name)
    model = artifacts.load_model(str(model_file))  # safe mode
    assert model.name == name and model.output.dtype == "float32"
    assert calibration.temperature_of(model) != 1.0  # calibrated, and exported so below
    paths = images.list_images(demo_dataset)[::24]
    pixels = np.stack([images.load_image(path, 32) for path in paths]).astype("float32")
    expected = (model.predict(pixels, verbose=0) + model.predict(pixels[:, :, ::-1],
                                                                 verbose=0)) / 2
    capsys.readouterr()
    # No --model: the run's labels.json names its model file.
    assert predict.main(["--image", *paths, "--labels", str(output / "labels.pickle"),
                         "--tta", "--format", "json", "--threshold", "0.01", "--top-k", "8",
                         "--explain", "--output", str(tmp_path / "explained")]) == 0
    found = json.loads(capsys.readouterr().out)
    classes = json.loads((output / "labels.json").read_text())["classes"]
    for row, path in zip(found, paths):  # a heat map the size of each photo
        heat_map = cv2.imread(row["heatmap"], cv2.IMREAD_UNCHANGED)
        assert heat_map.ndim == 2 and heat_map.shape == images.decode_image(path).shape[:2]
        assert os.path.exists(str(tmp_path / "explained" / os.path.basename(path)))
    for row, probabilities in zip(found, expected):
        for answer in row["predictions"]:
            assert answer["probability"] == pytest.approx(
                probabilities[classes.index(answer["label"])], abs=1e-5)
    float32 = networks.with_dtype_policy(model, "float32").predict(pixels, verbose=0)
    for kind, runner in (("savedmodel", run_savedmodel), ("tflite", run_tflite),
                         ("onnx", run_onnx)):
        target = str(tmp_path / "export" / export.FORMATS[kind][1].format(network=name))
        assert export.main(["--format", kind, "--labels", str(output / "labels.pickle"),
                            "--output", target]) == 0
        np.testing.assert_allclose(runner(target, pixels), float32, atol=1e-4, err_msg=kind)


def subset_dataset(demo_dataset, folder, classes):
    """A dataset of some of the demo classes, as links."""
    for label in classes:
        os.makedirs(folder / label)
        for name in os.listdir(os.path.join(demo_dataset, label)):
            os.symlink(os.path.join(demo_dataset, label, name), folder / label / name)
    return str(folder)


class Recorder(keras.callbacks.Callback):
    """What each epoch trains, and the weights training starts from."""

    def __init__(self):
        super().__init__()
        self.trainable, self.first_weights = {}, None

    def on_train_begin(self, logs=None):
        if self.first_weights is None:
            self.first_weights = {weight.path: weight.numpy() for weight in self.model.weights}

    def on_epoch_begin(self, epoch, logs=None):
        self.trainable[epoch] = sorted(weight.path for weight in self.model.trainable_weights)


class StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_init_from_the_same_classes_fine_tunes_the_whole_model(trained_run, tmp_path):
    source = os.path.join(trained_run["output"], artifacts.MODEL_FILE)
    recorder = Recorder()
    code = train.main(tiny_run(trained_run["dataset"], tmp_path, "--init-from", source,
                               "--epochs", "1"), extra_callbacks=[recorder])
    assert code == 0
    earlier = keras.models.load_model(source)
    for weight in earlier.weights:  # every weight, the output layer's too
        np.testing.assert_array_equal(recorder.first_weights[weight.path], weight.numpy())
    frozen = {weight.path for weight in earlier.weights} - set(recorder.trainable[0])
    assert frozen and all("batch_normalization" in path for path in frozen)
    config = json.loads((tmp_path / "Output" / "config.json").read_text())
    assert config["init_from"] == source and config["model"] == "vgg"
    info = json.loads((tmp_path / "Output" / "labels.json").read_text())
    assert info["started_from"] == source


@pytest.mark.slow
def test_init_from_other_classes_gets_a_new_output_layer_and_keeps_the_rest(trained_run,
                                                                             tmp_path):
    source = os.path.join(trained_run["output"], artifacts.MODEL_FILE)
    dataset = subset_dataset(trained_run["dataset"], tmp_path / "three",
                             ["blue_dress", "green_shoes", "red_shoes"])
    code = train.main(tiny_run(dataset, tmp_path, "--init-from", source, "--epochs", "1",
                               "--head-epochs", "1"))
    assert code == 0
    earlier = keras.models.load_model(source)
    model = artifacts.load_model(str(tmp_path / "Output" / artifacts.MODEL_FILE))
    assert model.output_shape == (None, 3)
    for layer in earlier.layers:
        if layer.name != "logits":  # the head phase trains the new output layer alone
            for new, old in zip(model.get_layer(layer.name).weights, layer.weights):
                np.testing.assert_array_equal(new.numpy(), old.numpy(), err_msg=layer.name)


def learning_rates(output):
    with open(os.path.join(output, run_folder.HISTORY_FILE), newline="") as handle:
        return {int(row["epoch"]): float(row["learning_rate"]) for row in csv.DictReader(handle)}


FINE_TUNING = ["--epochs", "4", "--head-epochs", "2", "--schedule", "onecycle",
               "--fine-tune-lr", "0.0003"]


@pytest.fixture(scope="module")
def fine_tuning_run(trained_run, tmp_path_factory):
    """A run of two phases never stopped, epochs 0-1 (the output layer) and 2-3 (all but
    BatchNormalization), from the trained run's model on three of its classes."""
    work = tmp_path_factory.mktemp("fine-tuning")
    dataset = subset_dataset(trained_run["dataset"], work / "three",
                             ["blue_dress", "green_shoes", "red_shoes"])
    flags = ["--init-from", os.path.join(trained_run["output"], artifacts.MODEL_FILE),
             *FINE_TUNING]
    whole = Recorder()
    assert train.main(tiny_run(dataset, work / "whole", *flags), extra_callbacks=[whole]) == 0
    return {"dataset": dataset, "flags": flags, "trainable": whole.trainable,
            "learning_rates": learning_rates(work / "whole" / "Output")}


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_a_fine_tuning_run_resumes_in_its_phase_as_if_never_stopped(fine_tuning_run, tmp_path,
                                                                    stop_at):
    """Stopped inside the first phase, between the two, or inside the second, then run
    again: the same trainable weights each epoch, the same learning rates."""
    whole = fine_tuning_run
    assert len(whole["trainable"][0]) == 2 < len(whole["trainable"][2])  # logits: kernel, bias
    resumed = Recorder()
    command = tiny_run(whole["dataset"], tmp_path, *whole["flags"])
    assert train.main(command, extra_callbacks=[StopAt(stop_at), resumed]) == 130
    assert train.main(command, extra_callbacks=[resumed]) == 0
    assert resumed.trainable == whole["trainable"]
    assert learning_rates(tmp_path / "Output") == pytest.approx(whole["learning_rates"],
                                                                 rel=1e-6)
    assert not (tmp_path / "Output" / run_folder.BACKUP_DIR).exists()


@pytest.mark.slow
def test_the_range_test_of_a_fine_tuning_run_trains_its_first_phase(trained_run, tmp_path,
                                                                     capsys, caplog):
    source = os.path.join(trained_run["output"], artifacts.MODEL_FILE)
    dataset = subset_dataset(trained_run["dataset"], tmp_path / "three",
                             ["blue_dress", "green_shoes", "red_shoes"])
    assert train.main(tiny_run(dataset, tmp_path, "--init-from", source, "--lr-find")) == 0
    assert "suggested learning rate: --lr" in capsys.readouterr().out
    assert "head: epochs 1 to 2" in caplog.text and "training 1539 weights" in caplog.text
    assert (tmp_path / "Output" / "lr_find.png").exists()
    assert not (tmp_path / "Output" / artifacts.MODEL_FILE).exists()
