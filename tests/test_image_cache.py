"""The image cache: decoded images kept between runs, read back row by row, and training
streamed from it."""

import json
import os

import numpy as np
import pytest

import train
from classifier import hardware, image_cache, images
from conftest import TINY_FLAGS, write_image


def make_files(folder, count=6):
    return [write_image(folder / f"{index}.png", np.full((30, 20, 3), 20 * index))
            for index in range(count)]


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts the files images.load_image really decodes."""
    decoded = []
    real = images.load_image_and_size

    def counting(path, *args, **kwargs):
        decoded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images, "load_image_and_size", counting)
    return decoded


def test_second_load_comes_from_the_cache_with_the_same_pixels(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data")
    first, kept, _, _ = image_cache.load_images(paths, 8, str(tmp_path / "cache"), progress=False)
    assert len(decode_counter) == 6
    second, kept_again, _, _ = image_cache.load_images(paths, 8, str(tmp_path / "cache"),
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
    rows, _, _, _ = image_cache.load_images(paths, 8, cache, progress=False)
    assert decode_counter == [paths[2]]
    assert rows[2].min() == 250 and rows[1].max() == 20
    assert len([name for name in os.listdir(cache) if name.endswith(".npy")]) == 1


def test_another_image_size_or_new_files_do_not_reuse_stale_rows(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data")
    cache = str(tmp_path / "cache")
    image_cache.load_images(paths, 8, cache, progress=False)
    rows, _, _, _ = image_cache.load_images(paths, 12, cache, progress=False)
    assert rows.shape == (6, 12, 12, 3) and len(decode_counter) == 12
    extra = write_image(tmp_path / "data" / "extra.png", np.full((9, 9, 3), 77))
    del decode_counter[:]
    rows, _, _, _ = image_cache.load_images([extra, *paths], 8, cache, progress=False)
    assert decode_counter == [extra] and rows[0].max() == 77 and rows.shape[0] == 7


def test_unreadable_files_are_remembered_as_skipped(tmp_path, decode_counter):
    paths = make_files(tmp_path / "data", 2)
    broken = tmp_path / "data" / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths.append(str(broken))
    cache = str(tmp_path / "cache")
    for _ in range(2):
        rows, kept, skipped, _ = image_cache.load_images(paths, 8, cache, progress=False)
        assert kept == [0, 1] and len(rows) == 2
        assert [path for path, _ in skipped] == [str(broken)]
    assert len(decode_counter) == 3


def test_a_damaged_index_means_a_fresh_cache_not_a_crash(tmp_path):
    paths = make_files(tmp_path / "data", 2)
    cache = tmp_path / "cache"
    image_cache.load_images(paths, 8, str(cache), progress=False)
    (cache / "images-8px.json").write_text('{"format": 1, "image_s')
    rows, _, _, _ = image_cache.load_images(paths, 8, str(cache), progress=False)
    assert len(rows) == 2


def test_image_rows_index_like_an_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "rows.npy", array)
    rows = image_cache.ImageRows(str(tmp_path / "rows.npy")).subset(np.array([9, 3, 5, 0]))
    assert rows.shape == (4, 4, 4, 3) and len(rows) == 4 and rows.size == 4 * 48
    np.testing.assert_array_equal(rows[np.array([2, 0])], array[[5, 9]])
    np.testing.assert_array_equal(rows[1], array[3])
    np.testing.assert_array_equal(rows.load(), array[[9, 3, 5, 0]])


def test_a_raised_or_lowered_max_pixels_takes_effect_over_a_warm_cache(tmp_path,
                                                                       decode_counter):
    paths = [write_image(tmp_path / "data" / f"{side}.png", np.full((side, side, 3), side))
             for side in (10, 20, 30)]
    cache = str(tmp_path / "cache")
    _, kept, skipped, _ = image_cache.load_images(paths, 8, cache, max_pixels=500, progress=False)
    assert kept == [0, 1] and skipped == [(paths[2], "30x30 pixels is over the limit of 500 "
                                                     "(--max-pixels)")]
    del decode_counter[:]
    rows, kept, _, _ = image_cache.load_images(paths, 8, cache, max_pixels=1000, progress=False)
    assert kept == [0, 1, 2] and decode_counter == [paths[2]]  # only the one refused before
    assert rows[2].min() == 30
    del decode_counter[:]
    rows, kept, skipped, _ = image_cache.load_images(paths, 8, cache, max_pixels=150,
                                                  progress=False)
    assert kept == [0] and decode_counter == []  # refused from the cache's own record
    assert [path for path, _ in skipped] == paths[1:]
    _, kept, _, _ = image_cache.load_images(paths, 8, cache, progress=False)
    assert kept == [0, 1, 2] and decode_counter == []


def test_rows_stay_readable_after_another_run_replaces_the_cache(tmp_path):
    paths = make_files(tmp_path / "data", 3)
    cache = str(tmp_path / "cache")
    rows, _, _, _ = image_cache.load_images(paths, 8, cache, progress=False)
    first = rows.load()
    write_image(paths[0], np.full((30, 20, 3), 250))  # a change: the cache is written anew
    stamp = os.stat(paths[0]).st_mtime_ns + 10**9
    os.utime(paths[0], ns=(stamp, stamp))
    image_cache.load_images(paths, 8, cache, progress=False)
    assert not os.path.exists(rows.path)  # the old data file is gone from the folder
    np.testing.assert_array_equal(rows.subset([2, 1]).load(), first[[2, 1]])


@pytest.mark.slow
def test_streamed_training_runs_end_to_end(demo_dataset, tmp_path):
    output = tmp_path / "Output"
    code = train.main(["--dataset", demo_dataset, "--output", str(output), "--logs",
                       str(tmp_path / "logs"), "--data-mode", "stream", "--augment", "layers",
                       *TINY_FLAGS])
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert config["data_mode"] == "stream" and config["precision"] in hardware.POLICIES.values()
    assert os.listdir(output / "cache")
    assert (output / "vgg_model.keras").exists()


def test_streaming_needs_the_cache(demo_dataset, tmp_path, caplog):
    code = train.main(["--dataset", demo_dataset, "--output", str(tmp_path / "out"),
                       "--data-mode", "stream", "--no-cache"])
    assert code == 2
    assert "drop --no-cache" in caplog.text
