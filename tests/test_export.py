"""Exported models predict what the Keras model predicts, in their own runtimes."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import export
import main
from classifier import calibration, images, networks


def sample_pixels(trained_run, size):
    paths = images.list_images(trained_run["dataset"])[::12][:6]
    return np.stack([images.load_image(path, size) for path in paths]).astype("float32")


def run_savedmodel(path, pixels):
    loaded = tf.saved_model.load(path)  # held: its variables die with it
    return loaded.serve(pixels).numpy()


def run_tflite(path, pixels):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path)
    given, wanted = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(given["index"], pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], pixels)
    interpreter.invoke()
    return interpreter.get_tensor(wanted["index"])


def run_onnx(path, pixels):
    import onnxruntime
    session = onnxruntime.InferenceSession(path)
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind, runner", [("savedmodel", run_savedmodel),
                                          ("tflite", run_tflite), ("onnx", run_onnx)])
def test_exported_model_matches_the_keras_model(trained_run, tmp_path, kind, runner):
    """A calibrated model, its temperature included: the exports give calibrated numbers."""
    output = trained_run["output"]
    trained = keras.models.load_model(os.path.join(output, "vgg_model.keras"))
    model_path = str(tmp_path / "vgg_model.keras")
    calibration.with_temperature(trained, 3.0, multi_label=False).save(model_path)
    target = str(tmp_path / export.FORMATS[kind][1])
    code = main.main(["export", "--format", kind, "--model", model_path, "--labels",
                      os.path.join(output, "labels.pickle"), "--output", target])
    assert code == 0 and os.path.exists(target)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    labels = json.loads((tmp_path / "labels.json").read_text())
    model = keras.models.load_model(model_path)
    pixels = sample_pixels(trained_run, model.input_shape[1])
    # The export computes in float32 (the converters refuse mixed precision): so does this.
    expected = networks.with_dtype_policy(model, "float32").predict(pixels, verbose=0)
    exported = runner(target, pixels)
    assert exported.shape == expected.shape == (len(pixels), len(labels["classes"]))
    np.testing.assert_allclose(exported, expected, atol=1e-4)
    # The model as trained: bfloat16 where the CPU computes it natively (8 bits of mantissa).
    np.testing.assert_allclose(exported, model.predict(pixels, verbose=0), atol=0.02)
    assert np.abs(exported - trained.predict(pixels, verbose=0)).max() > 0.02  # calibrated


def test_exporting_without_a_model_is_a_one_line_error(tmp_path, caplog):
    code = export.main(["--model", str(tmp_path / "none.keras"), "--output",
                        str(tmp_path / "out")])
    assert code == 2
    assert "train one first" in caplog.text
