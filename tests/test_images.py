"""Finding, decoding and preprocessing: the path shared by training and prediction."""

import _thread
import os
import signal

import numpy as np
import pytest
from PIL import Image

from classifier import images
from classifier.cli import UserError
from conftest import write_image


def test_list_images_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    write_image(tmp_path / "cat" / "b.jpg", np.zeros((8, 8, 3)))
    write_image(tmp_path / "cat" / "nested" / "a.PNG", np.zeros((8, 8, 3)))
    write_image(tmp_path / "dog" / ".hidden.jpg", np.zeros((8, 8, 3)))
    write_image(tmp_path / ".cache" / "c.jpg", np.zeros((8, 8, 3)))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\0")
    found = [os.path.relpath(p, tmp_path) for p in images.list_images(str(tmp_path))]
    assert found == [os.path.join("cat", "b.jpg"), os.path.join("cat", "nested", "a.PNG")]


def test_label_is_the_first_folder_under_the_root(tmp_path):
    root = str(tmp_path)
    assert images.label_of(os.path.join(root, "red_dress", "x.jpg"), root) == "red_dress"
    assert images.label_of(os.path.join(root, "red_dress", "2019", "x.jpg"), root) == "red_dress"
    assert images.label_of(os.path.join(root, "loose.jpg"), root) is None


def test_missing_dataset_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        images.list_images(str(tmp_path / "nope"))


def test_decode_returns_rgb_in_channel_order(tmp_path):
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 255
    path = write_image(tmp_path / "red.png", red)
    decoded = images.decode_image(path)
    assert decoded.shape == (10, 10, 3) and decoded.dtype == np.uint8
    assert decoded[0, 0].tolist() == [255, 0, 0]


def test_load_image_resizes_to_a_uint8_square(tmp_path):
    path = write_image(tmp_path / "wide.jpg", np.full((30, 90, 3), 128))
    loaded = images.load_image(path, 16)
    assert loaded.shape == (16, 16, 3) and loaded.dtype == np.uint8


def test_reduced_jpeg_decoding_matches_full_decoding(tmp_path):
    y, x = np.mgrid[0:800, 0:600] / 800
    smooth = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(8 * x * y)], axis=2)
    path = write_image(tmp_path / "big.jpg", smooth)
    fast = images.load_image(path, 64).astype(int)
    full = images.resize(images.decode_image(path), 64).astype(int)
    assert np.abs(fast - full).mean() < 3


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(600, 800), (533, 400), (130, 1000), (300, 300), (90, 70)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_opencv_jpeg_path_gives_pillows_pixels(tmp_path, size, orientation, mode):
    rng = np.random.default_rng(orientation)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    photo = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(8 * x * y)], axis=2)
    photo = np.clip(photo + rng.normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
    path = str(tmp_path / "photo.jpg")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(photo).convert(mode).save(path, exif=exif, quality=90)
    for min_side in (None, 32, 64):
        with Image.open(path) as image:
            reduction = images._jpeg_reduction(*image.size, min_side)
            by_pillow = images._decode_with_pillow(image, reduction)
        np.testing.assert_array_equal(images.decode_image(path, min_side=min_side), by_pillow)


def test_jpeg_with_bytes_after_its_end_marker_still_decodes(tmp_path):
    path = write_image(tmp_path / "padded.jpg", np.full((40, 40, 3), 90))
    with open(path, "ab") as handle:
        handle.write(b"\0" * 16 + b"camera maker notes")
    assert images.decode_image(path)[20, 20].tolist() == [90, 90, 90]


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    path = str(tmp_path / "clear.png")
    Image.fromarray(rgba, "RGBA").save(path)
    assert images.decode_image(path)[0, 0].tolist() == [255, 255, 255]


def test_grayscale_becomes_three_channels(tmp_path):
    path = str(tmp_path / "gray.png")
    Image.fromarray(np.full((5, 5), 77, np.uint8), "L").save(path)
    decoded = images.decode_image(path)
    assert decoded.shape == (5, 5, 3) and decoded[0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_is_applied(tmp_path):
    path = str(tmp_path / "phone.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif)
    assert images.decode_image(path).shape == (40, 20, 3)


def test_huge_pixel_counts_are_refused_before_decoding(tmp_path):
    path = str(tmp_path / "big.png")
    Image.new("L", (300, 300)).save(path)
    with pytest.raises(images.ImageError, match="over the limit"):
        images.decode_image(path, max_pixels=300 * 299)


def test_load_images_skips_unreadable_files_with_reasons(tmp_path):
    good = write_image(tmp_path / "good.jpg", np.full((20, 20, 3), 90))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.png"
    junk.write_bytes(os.urandom(300))
    data, kept, skipped, _ = images.load_images([str(empty), good, str(junk)], 8, progress=False)
    assert data.shape == (1, 8, 8, 3) and kept == [1]
    reasons = dict(skipped)
    assert reasons[str(empty)] == "empty file"
    assert str(junk) in reasons


def test_ctrl_c_while_loading_stops_without_decoding_the_rest(tmp_path):
    path = write_image(tmp_path / "a.jpg", np.full((20, 20, 3), 90))
    stored = []

    def store(position, image, size):
        stored.append(position)
        if len(stored) == 10:
            _thread.interrupt_main()  # what Ctrl-C does to the main thread

    # A shell that started the tests in the background may ignore SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            images.decode_into([path] * 5000, 8, store, workers=2, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(stored) < 500
