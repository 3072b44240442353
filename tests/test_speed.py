"""The image cache, streaming from it, the Keras-layer augmentation and precision selection."""

import json
import math
import os

import keras
import numpy as np
import pytest
from tensorflow.keras.preprocessing.image import ImageDataGenerator

import image_cache
import images
import train
import vgg
from conftest import TINY_FLAGS, write_image


def make_files(folder, count=6):
    return [write_image(folder / f"{index}.png", np.full((30, 20, 3), 20 * index))
            for index in range(count)]


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts the files images.load_image really decodes."""
    decoded = []
    real = images.load_image

    def counting(path, *args, **kwargs):
        decoded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", counting)
    return decoded


def test_second_load_comes_from_the_cache_with_the_same_pixels(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data")
    first, kept, _ = image_cache.load_images(paths, 8, str(tmp_path / "cache"), progress=False)
    assert len(decode_counter) == 6
    second, kept_again, _ = image_cache.load_images(paths, 8, str(tmp_path / "cache"),
                                                    progress=False)
    assert len(decode_counter) == 6  # nothing decoded the second time
    assert kept == kept_again == list(range(6))
    np.testing.assert_array_equal(first.load(), second.load())
    np.testing.assert_array_equal(second.load(), images.load_images(paths, 8, progress=False)[0])


def test_a_changed_file_is_decoded_again_and_only_it(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data")
    cache = str(tmp_path / "cache")
    image_cache.load_images(paths, 8, cache, progress=False)
    write_image(paths[2], np.full((30, 20, 3), 250))
    stamp = os.stat(paths[2]).st_mtime_ns + 10**9
    os.utime(paths[2], ns=(stamp, stamp))
    del decode_counter[:]
    rows, _, _ = image_cache.load_images(paths, 8, cache, progress=False)
    assert decode_counter == [paths[2]]
    assert rows[2].min() == 250 and rows[1].max() == 20
    assert len([name for name in os.listdir(cache) if name.endswith(".npy")]) == 1


def test_another_image_size_or_new_files_do_not_reuse_stale_rows(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data")
    cache = str(tmp_path / "cache")
    image_cache.load_images(paths, 8, cache, progress=False)
    rows, _, _ = image_cache.load_images(paths, 12, cache, progress=False)
    assert rows.shape == (6, 12, 12, 3) and len(decode_counter) == 12
    extra = write_image(tmp_path / "data" / "extra.png", np.full((9, 9, 3), 77))
    del decode_counter[:]
    rows, _, _ = image_cache.load_images([extra, *paths], 8, cache, progress=False)
    assert decode_counter == [extra] and rows[0].max() == 77 and rows.shape[0] == 7


def test_unreadable_files_are_remembered_as_skipped(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data", 2)
    broken = tmp_path / "data" / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths.append(str(broken))
    cache = str(tmp_path / "cache")
    for _ in range(2):
        rows, kept, skipped = image_cache.load_images(paths, 8, cache, progress=False)
        assert kept == [0, 1] and len(rows) == 2
        assert [path for path, _ in skipped] == [str(broken)]
    assert len(decode_counter) == 3


def test_a_damaged_index_means_a_fresh_cache_not_a_crash(tmp_path):
    paths = make_files(tmp_path / "data", 2)
    cache = tmp_path / "cache"
    image_cache.load_images(paths, 8, str(cache), progress=False)
    (cache / "images-8px.json").write_text('{"format": 1, "image_s')
    rows, _, _ = image_cache.load_images(paths, 8, str(cache), progress=False)
    assert len(rows) == 2


def test_image_rows_index_like_an_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "rows.npy", array)
    rows = image_cache.ImageRows(str(tmp_path / "rows.npy")).subset(np.array([9, 3, 5, 0]))
    assert rows.shape == (4, 4, 4, 3) and len(rows) == 4 and rows.size == 4 * 48
    np.testing.assert_array_equal(rows[np.array([2, 0])], array[[5, 9]])
    np.testing.assert_array_equal(rows[1], array[3])
    np.testing.assert_array_equal(rows.load(), array[[9, 3, 5, 0]])


def split_both_ways(tmp_path):
    folder = tmp_path / "data"
    paths = [write_image(folder / f"{index:02d}.png", np.full((12, 12, 3), index * 9))
             for index in range(20)]
    labels = np.array(["a", "b"] * 10)
    targets = np.eye(2, dtype=np.float32)[(labels == "b").astype(int)]
    rows, _, _ = image_cache.load_images(paths, 8, str(tmp_path / "cache"), progress=False)
    args = train.parse_args(["--dataset", str(folder), "--seed", "3"])
    in_memory = train.split(rows, labels, targets, args, in_memory=True)
    streamed = train.split(rows, labels, targets, args, in_memory=False)
    return in_memory, streamed


def test_streaming_and_in_memory_give_the_same_batches(tmp_path):
    in_memory, streamed = split_both_ways(tmp_path)
    assert isinstance(in_memory[0], np.ndarray)
    assert isinstance(streamed[0], image_cache.ImageRows)
    generator = ImageDataGenerator(rotation_range=30, horizontal_flip=True)
    memory_batches = train.training_batches(in_memory[0], in_memory[2], 4, generator, seed=1)
    stream_batches = train.training_batches(streamed[0], streamed[2], 4, generator, seed=1)
    sizes = []
    for (memory_x, memory_y), (stream_x, stream_y) in zip(memory_batches.take(6),
                                                          stream_batches.take(6)):
        sizes.append(len(memory_x))
        assert memory_x.shape == stream_x.shape and memory_x.shape[1:] == (8, 8, 3)
        np.testing.assert_array_equal(memory_y, stream_y)
        np.testing.assert_array_equal(memory_x, stream_x)
    assert sizes == [4, 4, 4, 4, 1, 4]  # 17 training images: the epoch's last batch has one
    memory_test = list(train.batches(in_memory[1], in_memory[3], 2).as_numpy_iterator())
    stream_test = list(train.batches(streamed[1], streamed[3], 2).as_numpy_iterator())
    assert len(memory_test) == len(stream_test) == 2  # 3 test images: a batch of 2, one of 1
    for (memory_x, memory_y), (stream_x, stream_y) in zip(memory_test, stream_test):
        np.testing.assert_array_equal(memory_x, stream_x)
        np.testing.assert_array_equal(memory_y, stream_y)


def test_streamed_training_runs_end_to_end(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    code = train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--data-mode", "stream", "--augment", "layers",
                       *TINY_FLAGS])
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert config["data_mode"] == "stream" and config["precision"] in train.POLICIES.values()
    assert os.listdir(output / "cache")
    assert (output / "vgg_model.keras").exists()


def test_streaming_needs_the_cache(demo_dataset, tmp_path, caplog):
    code = train.main(["--dataset", demo_dataset, "--output", str(tmp_path / "out"),
                       "--data-mode", "stream", "--no-cache"])
    assert code == 2
    assert "drop --no-cache" in caplog.text


def test_auto_data_mode_streams_only_what_does_not_fit():
    assert train.choose_data_mode("auto", 10 * 2**30, 16 * 2**30) == "stream"
    assert train.choose_data_mode("auto", 1 * 2**30, 16 * 2**30) == "memory"
    assert train.choose_data_mode("stream", 1, 2**40) == "stream"
    assert train.choose_data_mode("memory", 2**40, 1) == "memory"


def test_layer_augmentation_uses_the_generator_parameters():
    args = train.parse_args(["--rotation-range", "45", "--shear-range", "10",
                             "--zoom-range", "0.2", "--width-shift-range", "0.1"])
    augmentation = train.augmentation_layers(args, seed=0)
    found = {type(layer).__name__: layer for layer in augmentation.layers}
    assert found["RandomRotation"].factor == pytest.approx((-45 / 360, 45 / 360))
    assert found["RandomShear"].x_factor == pytest.approx(
        (-math.tan(math.radians(10)), math.tan(math.radians(10))))
    assert found["RandomZoom"].height_factor == found["RandomZoom"].width_factor == (-0.2, 0.2)
    assert found["RandomFlip"].mode == "horizontal"
    off = train.parse_args(["--rotation-range", "0", "--shear-range", "0", "--zoom-range", "0",
                            "--width-shift-range", "0", "--height-shift-range", "0",
                            "--no-horizontal-flip"])
    assert train.augmentation_layers(off, seed=0) is None


def test_layer_augmentation_changes_each_image_differently():
    args = train.parse_args([])
    pattern = np.tile((np.arange(16 * 16 * 3).reshape(1, 16, 16, 3) % 251).astype(np.uint8),
                      (4, 1, 1, 1))
    batch_x, _ = next(iter(train.training_batches(
        pattern, np.eye(4, dtype=np.float32), 4, train.augmentation_layers(args, 0), seed=0)))
    batch_x = batch_x.numpy()
    assert batch_x.dtype == np.float32
    assert not np.array_equal(batch_x[0], batch_x[1])
    assert not np.array_equal(batch_x[0], pattern[0].astype(np.float32))


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
    assert train.choose_precision(requested, gpus, flags) == expected


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
