"""main.py dispatches to the same code as train.py and predict.py, in both spellings."""

import os

import main
from test_predict import LINE


def test_predict_spellings_run_predict(trained_run, capsys):
    image = os.path.join(trained_run["dataset"], "green_shoes", "green_shoes_0002.jpg")
    model_flags = ["--model", os.path.join(trained_run["output"], "vgg_model.keras"),
                   "--labels", os.path.join(trained_run["output"], "labels.pickle"),
                   "--output", os.path.join(trained_run["output"], "via_main")]
    assert main.main(["-predict", image, *model_flags]) == 0
    assert main.main(["predict", "--image", image, *model_flags]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and LINE.match(lines[0])


def test_train_spellings_reach_train(tmp_path, caplog):
    for spelling in ("train", "-train"):
        assert main.main([spelling, "--dataset", str(tmp_path / "absent"),
                          "--output", str(tmp_path / "out"), "--logs", str(tmp_path)]) == 2
    assert caplog.text.count("dataset folder not found") == 2


def test_unknown_command_prints_usage(capsys):
    assert main.main(["fly"]) == 2
    assert "python main.py train" in capsys.readouterr().err
