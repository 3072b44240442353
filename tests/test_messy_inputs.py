"""Bad and odd inputs: training uses every decodable image, prediction goes on past bad ones."""

import csv
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

import predict
import train
from classifier import images
from conftest import TINY_FLAGS
from messy import bad_files, ignored_files, odd_files, write_all


@pytest.mark.parametrize("name", sorted(odd_files()))
def test_odd_but_valid_images_decode_to_rgb(tmp_path, name):
    write_all(str(tmp_path), {name: odd_files()[name]})
    loaded = images.load_image(str(tmp_path / name), 32)
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_are_refused_with_a_reason(tmp_path, name):
    content, reason = bad_files()[name]
    write_all(str(tmp_path), {name: content})
    with pytest.raises(images.ImageError, match=reason):
        images.load_image(str(tmp_path / name), 32)


@pytest.mark.parametrize("name", sorted(odd_files()) + sorted(bad_files()))
def test_an_image_in_memory_decodes_as_its_file_does(tmp_path, name):
    # serve.py decodes uploads from memory: the model must see the pixels, or the refusal,
    # that predict.py gets from the same file.
    content = odd_files()[name] if name in odd_files() else bad_files()[name][0]
    write_all(str(tmp_path), {name: content})
    outcomes = []
    for load, source in ((images.load_image, str(tmp_path / name)),
                         (images.load_image_bytes, content)):
        try:
            outcomes.append(load(source, 32, max_pixels=10_000_000))
        except images.ImageError as error:
            outcomes.append(str(error))
    if isinstance(outcomes[0], str):
        assert outcomes[1] == outcomes[0]
    else:
        np.testing.assert_array_equal(outcomes[1], outcomes[0])


def test_sixteen_bit_and_cmyk_keep_their_brightness(tmp_path):
    write_all(str(tmp_path), odd_files())
    gray16 = images.decode_image(str(tmp_path / "sixteen_bit.png"))
    assert gray16.max() > 200 and gray16.min() < 10  # scaled to 8 bits, not clipped to white
    red = Image.new("RGB", (16, 16), (200, 40, 40))
    red.convert("CMYK").save(str(tmp_path / "red_cmyk.jpg"), "JPEG")
    cmyk = images.decode_image(str(tmp_path / "red_cmyk.jpg")).reshape(-1, 3).mean(axis=0)
    assert np.abs(cmyk - (200, 40, 40)).max() < 12


def test_symbolic_link_loops_do_not_hang_the_listing(tmp_path):
    (tmp_path / "cats").mkdir()
    write_all(str(tmp_path / "cats"), {"a.png": odd_files()["gray.png"]})
    os.symlink(str(tmp_path), str(tmp_path / "cats" / "loop"))
    os.symlink(str(tmp_path / "cats"), str(tmp_path / "cats" / "again"))
    found = []
    listing = threading.Thread(target=lambda: found.extend(images.list_images(str(tmp_path))))
    listing.start()
    listing.join(timeout=300)  # a generous deadline: a loop that does not end fails here
    assert not listing.is_alive() and len(found) == 1


@pytest.mark.slow
def test_training_on_a_messy_folder_uses_every_decodable_image(tmp_path, demo_dataset, caplog):
    dataset = tmp_path / "data"
    for class_name in ("black_dress", "red_shoes"):
        source = os.path.join(demo_dataset, class_name)
        for name in os.listdir(source):
            with open(os.path.join(source, name), "rb") as handle:
                write_all(str(dataset / class_name), {name: handle.read()})
    write_all(str(dataset / "black_dress"), bad_files())
    write_all(str(dataset / "red_shoes" / "nested"), odd_files())
    write_all(str(dataset / "red_shoes"), ignored_files())
    (dataset / "empty_class").mkdir()
    output = tmp_path / "Output"
    code = train.main(["--dataset", str(dataset), "--output", str(output), "--logs",
                       str(tmp_path / "logs"), *TINY_FLAGS[:-4], "--epochs", "1"])
    assert code == 0
    with open(output / "skipped_files.csv", newline="", encoding="utf-8") as handle:
        skipped = {os.path.basename(row["path"]): row["reason"] for row in csv.DictReader(handle)}
    assert set(skipped) == set(bad_files())
    for name, (_, reason) in bad_files().items():
        assert reason in skipped[name]
        assert f"skipped {os.path.join(str(dataset), 'black_dress', name)}" in caplog.text
    config = json.load(open(output / "config.json"))
    used = 12 + 12 + len(odd_files())
    assert config["train_images"] + config["test_images"] == used
    assert "empty_class holds no images" in caplog.text


def test_prediction_reports_each_bad_file_and_predicts_the_rest(trained_run, tmp_path,
                                                                capsys):
    write_all(str(tmp_path), bad_files())
    write_all(str(tmp_path), odd_files())
    out = trained_run["output"]
    code = predict.main(["--image", str(tmp_path), "--model", os.path.join(out, "vgg_model.keras"),
                         "--labels", os.path.join(out, "labels.pickle"),
                         "--output", str(tmp_path / "predictions")])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == len(bad_files())
    for name, (_, reason) in bad_files().items():
        assert any(line.startswith(str(tmp_path / name) + ": error:") and reason in line
                   for line in errors), name
    assert len(captured.out.strip().splitlines()) == len(odd_files())
    written = os.listdir(tmp_path / "predictions")
    assert len(written) == len(odd_files()) and "naïve café photo.jpg" in written
    assert "Traceback" not in captured.err


def test_prediction_never_writes_outside_its_output_folder(trained_run, tmp_path):
    inner = tmp_path / "a" / "b"
    write_all(str(inner), {"..jpg": odd_files()["UPPER.JPG"]})
    out = trained_run["output"]
    target = tmp_path / "a" / "predictions"
    code = predict.main(["--image", str(inner / ".." / "b" / "..jpg"),
                         "--model", os.path.join(out, "vgg_model.keras"),
                         "--labels", os.path.join(out, "labels.pickle"), "--output", str(target)])
    assert code == 0
    assert len(os.listdir(target)) == 1
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "predictions"]
