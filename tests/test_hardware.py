"""Choices made for the machine: precision (native bfloat16 only) and streaming from the cache."""

import json

import keras
import numpy as np
import pytest

import train
import vgg
from classifier import hardware
from conftest import TINY_FLAGS


def test_auto_data_mode_streams_only_what_does_not_fit():
    assert hardware.choose_data_mode("auto", 10 * 2**30, 16 * 2**30) == "stream"
    assert hardware.choose_data_mode("auto", 1 * 2**30, 16 * 2**30) == "memory"
    assert hardware.choose_data_mode("stream", 1, 2**40) == "stream"
    assert hardware.choose_data_mode("memory", 2**40, 1) == "memory"


@pytest.mark.parametrize("requested, gpus, flags, expected", [
    ("auto", [], ["avx2", "fma"], "float32"),
    ("auto", [], ["avx2", "avx512f", "avx512_bf16"], "mixed_bfloat16"),
    ("auto", [], ["amx_bf16", "amx_tile"], "mixed_bfloat16"),
    ("auto", [(9, 0)], ["avx2"], "mixed_bfloat16"),
    ("auto", [(8, 0), (7, 5)], [], "mixed_float16"),
    ("auto", [(6, 1)], ["avx512_bf16"], "float32"),
    ("float32", [(9, 0)], ["avx512_bf16"], "float32"),
    ("bfloat16", [], [], "mixed_bfloat16"),
    ("float16", [], [], "mixed_float16"),
])
def test_precision_selection(requested, gpus, flags, expected):
    assert hardware.choose_precision(requested, gpus, flags) == expected


def test_mixed_precision_model_computes_in_bfloat16_and_outputs_float32():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = vgg.build_vgg((16, 16, 3), 3)
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        convolution = next(layer for layer in model.layers if "conv" in layer.name)
        assert convolution.compute_dtype == "bfloat16"
        assert convolution.variable_dtype == "float32"
        assert model.output.dtype == "float32"
        x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
        loss = model.train_on_batch(x, np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
        assert np.isfinite(loss)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.slow
def test_precision_flag_reaches_the_saved_model(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "1"
    assert train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--precision", "bfloat16", *flags]) == 0
    assert keras.mixed_precision.dtype_policy().name == "float32"
    model = keras.models.load_model(output / "vgg_model.keras")
    convolution = next(layer for layer in model.layers if "conv" in layer.name)
    assert convolution.compute_dtype == "bfloat16"
    assert json.loads((output / "config.json").read_text())["precision"] == "mixed_bfloat16"
