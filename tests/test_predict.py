"""Prediction: the same preprocessing as training, one line per image, annotated copies."""

import csv
import json
import os
import re

import cv2
import keras
import numpy as np

import predict
from classifier import images
from conftest import write_image

LINE = re.compile(r"^(?P<path>.+): (?P<label>\S+) (?P<percent>\d+\.\d{2})%$")


def run_predict(trained_run, capsys, *inputs, output="predictions"):
    out = trained_run["output"]
    code = predict.main(["--image", *inputs, "--model", os.path.join(out, "vgg_model.keras"),
                         "--labels", os.path.join(out, "labels.pickle"),
                         "--output", os.path.join(out, output)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def test_predicts_one_of_the_classes_and_writes_an_annotated_copy(trained_run, capsys):
    image = os.path.join(trained_run["dataset"], "red_dress", "red_dress_0000.jpg")
    code, lines, _ = run_predict(trained_run, capsys, image)
    assert code == 0 and len(lines) == 1
    match = LINE.match(lines[0])
    assert match and match["path"] == image
    classes = os.listdir(trained_run["dataset"])
    assert match["label"] in classes
    assert float(match["percent"]) >= 100 / len(classes)  # the likeliest of them
    annotated = os.path.join(trained_run["output"], "predictions", "red_dress_0000.jpg")
    assert images.decode_image(annotated).shape[1] == 400


def test_prediction_uses_the_training_preprocessing(trained_run, capsys):
    image = os.path.join(trained_run["dataset"], "blue_pants", "blue_pants_0001.jpg")
    _, lines, _ = run_predict(trained_run, capsys, image)
    model = keras.models.load_model(os.path.join(trained_run["output"], "vgg_model.keras"))
    pixels = images.load_image(image, model.input_shape[1])[None].astype("float32")
    expected = model.predict(pixels, verbose=0)[0].max() * 100
    assert abs(float(LINE.match(lines[0])["percent"]) - expected) < 0.01


def test_folders_are_expanded_and_bad_images_do_not_stop_the_others(trained_run, capsys,
                                                                     tmp_path):
    write_image(tmp_path / "a.jpg", np.full((40, 30, 3), 200))
    write_image(tmp_path / "sub" / "a.jpg", np.full((40, 30, 3), 20))
    (tmp_path / "broken.jpg").write_bytes(b"<html>not an image</html>")
    code, lines, errors = run_predict(trained_run, capsys, str(tmp_path),
                                      str(tmp_path / "nowhere.jpg"), output="mixed")
    assert code == 1
    assert len(lines) == 2 and all(LINE.match(line) for line in lines)
    assert "broken.jpg: error:" in errors and "nowhere.jpg: error:" in errors
    assert "Traceback" not in errors
    written = sorted(os.listdir(os.path.join(trained_run["output"], "mixed")))
    assert written == ["a.jpg", "a_2.jpg"]


def test_missing_model_tells_the_user_to_train_first(tmp_path, caplog):
    image = write_image(tmp_path / "x.jpg", np.zeros((8, 8, 3)))
    code = predict.main(["--image", image, "--model", str(tmp_path / "none.keras")])
    assert code == 2
    assert "train one first" in caplog.text


def test_a_damaged_model_file_is_named_as_such(tmp_path, caplog):
    image = write_image(tmp_path / "x.jpg", np.zeros((8, 8, 3)))
    damaged = tmp_path / "vgg_model.keras"
    damaged.write_bytes(np.random.default_rng(0).bytes(4096))
    code = predict.main(["--image", image, "--model", str(damaged)])
    assert code == 2
    assert "is not a model file this program can read" in caplog.text
    assert "not found" not in caplog.text


def test_a_folder_without_images_is_reported_and_fails(trained_run, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    code, out, err = predict_many(trained_run, capsys, "--image", str(tmp_path / "empty"),
                                  "--output", str(tmp_path / "annotated"))
    assert code == 1
    assert f"{tmp_path / 'empty'}: error: no image files in this folder" in err


def predict_many(trained_run, capsys, *flags):
    out = trained_run["output"]
    code = predict.main([*flags, "--model", os.path.join(out, "vgg_model.keras"),
                         "--labels", os.path.join(out, "labels.pickle")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_top_k_lists_the_likeliest_classes_in_order(trained_run, capsys, tmp_path):
    image = os.path.join(trained_run["dataset"], "red_dress", "red_dress_0000.jpg")
    code, out, _ = predict_many(trained_run, capsys, "--image", image, "--top-k", "3",
                                "--output", str(tmp_path))
    assert code == 0
    path, ranked = out.strip().split(": ", 1)
    pairs = [part.rsplit(" ", 1) for part in ranked.split(", ")]
    assert path == image and len(pairs) == 3
    percents = [float(percent.rstrip("%")) for _, percent in pairs]
    assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.01
    assert len({label for label, _ in pairs}) == 3


def test_glob_patterns_csv_results_and_errors(trained_run, capsys, tmp_path):
    dataset = trained_run["dataset"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    results = tmp_path / "results.csv"
    code, out, errors = predict_many(
        trained_run, capsys, "--image", os.path.join(dataset, "red_*", "*_000[0-1].jpg"),
        str(broken), os.path.join(str(tmp_path), "none*.jpg"), "--format", "csv",
        "--top-k", "2", "--results", str(results), "--no-annotate",
        "--output", str(tmp_path / "copies"))
    assert code == 1 and out == ""
    assert "broken.jpg: error:" in errors and "none*.jpg: error:" in errors
    with open(results, newline="") as handle:
        rows = list(csv.DictReader(handle))
    predicted = [row for row in rows if not row["error"]]
    assert len(predicted) == 2 * 4  # red_dress and red_shoes, two images each, top 2
    assert {row["rank"] for row in predicted} == {"1", "2"}
    for path in {row["path"] for row in predicted}:
        first, second = (float(row["probability"]) for row in predicted if row["path"] == path)
        assert 1 >= first >= second >= 0
    assert {row["path"] for row in rows if row["error"]} == {
        str(broken), os.path.join(str(tmp_path), "none*.jpg")}
    assert os.listdir(tmp_path / "copies") == []


def test_json_to_standard_output_and_a_montage(trained_run, capsys, tmp_path):
    folder = os.path.join(trained_run["dataset"], "green_shoes")
    montage = tmp_path / "montage.jpg"
    code, out, _ = predict_many(trained_run, capsys, "--image", folder, "--format", "json",
                                "--montage", str(montage), "--output", str(tmp_path / "copies"))
    assert code == 0
    results = json.loads(out)
    assert len(results) == len(images.list_images(folder)) == 12
    classes = set(os.listdir(trained_run["dataset"]))
    for result in results:
        (prediction,) = result["predictions"]
        assert prediction["label"] in classes
        assert 1 >= prediction["probability"] >= 1 / len(classes)  # the likeliest of them
    picture = images.decode_image(str(montage))
    assert picture.shape == (2 * predict.TILE, 8 * predict.TILE, 3)  # 12 images: 8 + 4
    assert len(os.listdir(tmp_path / "copies")) == 12


def test_min_confidence_answers_unknown_in_every_format(trained_run, capsys, tmp_path):
    """Under --min-confidence an image is 'unknown': in the table, the CSV and JSON answers,
    and on its annotated copy (orange, not green); the exit code stays 0."""
    image = os.path.join(trained_run["dataset"], "red_dress", "red_dress_0000.jpg")
    outputs = {}
    for kind in ("table", "csv", "json"):
        code, outputs[kind], _ = predict_many(
            trained_run, capsys, "--image", image, "--format", kind, "--min-confidence", "1",
            "--output", str(tmp_path / kind))
        assert code == 0
    assert re.fullmatch(r".+: unknown \(\S+ \d+\.\d{2}%\)\n", outputs["table"])
    row = next(csv.DictReader(outputs["csv"].splitlines()))
    assert row["answer"] == "unknown" and row["label"] in os.listdir(trained_run["dataset"])
    said = json.loads(outputs["json"])[0]
    assert said["answer"] == "unknown" and said["predictions"][0]["probability"] < 1
    band = images.decode_image(str(tmp_path / "table" / "red_dress_0000.jpg"))[:60]
    red, green, blue = (band[..., channel].astype(int) for channel in range(3))
    assert ((red > 200) & (green > 120) & (green < 210) & (blue < 80)).sum() > 50  # orange


def test_without_min_confidence_the_outputs_are_as_before(trained_run, capsys, tmp_path):
    image = os.path.join(trained_run["dataset"], "red_dress", "red_dress_0000.jpg")
    _, out, _ = predict_many(trained_run, capsys, "--image", image, "--format", "csv",
                             "--output", str(tmp_path))
    assert out.splitlines()[0] == "path,rank,label,probability,error"
    _, out, _ = predict_many(trained_run, capsys, "--image", image, "--format", "json",
                             "--min-confidence", "0", "--output", str(tmp_path))
    assert list(json.loads(out)[0]) == ["path", "predictions"]
    _, out, _ = predict_many(trained_run, capsys, "--image", image, "--min-confidence",
                             "0.01", "--output", str(tmp_path))
    assert "unknown" not in out and LINE.match(out.strip())


def test_explain_writes_a_grayscale_heat_map_the_size_of_each_image(trained_run, capsys,
                                                                     tmp_path):
    write_image(tmp_path / "wide.jpg", np.random.default_rng(0).integers(0, 255, (30, 70, 3)))
    image = os.path.join(trained_run["dataset"], "red_dress", "red_dress_0000.jpg")
    out = tmp_path / "explained"
    code, lines, _ = run_predict(trained_run, capsys, image, str(tmp_path / "wide.jpg"),
                                 "--explain", output=str(out))
    assert code == 0 and len(lines) == 2
    for name, source in (("red_dress_0000", image), ("wide", str(tmp_path / "wide.jpg"))):
        heat_map = cv2.imread(str(out / f"{name}_heatmap.png"), cv2.IMREAD_UNCHANGED)
        assert heat_map.ndim == 2 and heat_map.shape == images.decode_image(source).shape[:2]
    plain = tmp_path / "plain"
    run_predict(trained_run, capsys, image, output=str(plain))
    # The overlay: the annotated copy differs from the one drawn without --explain.
    difference = np.abs(images.decode_image(str(out / "red_dress_0000.jpg")).astype(int)
                        - images.decode_image(str(plain / "red_dress_0000.jpg")))
    assert difference.mean() > 5
