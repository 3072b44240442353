"""Every value is checked before any image is loaded: each numeric flag and config key has
its range, and a config file of any keys, types and values gives a run or one clear error."""

import json

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

import predict
import train
from classifier import settings
from classifier.cli import UserError


def numeric_flags(parser):
    return [action for action in parser._actions if action.type in (int, float)]


@pytest.mark.parametrize("parser, ranges", [(settings.build_parser(), settings.RANGES),
                                            (predict.build_parser(), predict.RANGES)])
def test_every_numeric_flag_has_a_range(parser, ranges):
    flags = numeric_flags(parser)
    assert flags
    assert {action.dest for action in flags} <= set(ranges), "a numeric flag without a range"


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--lr", "-1", "--lr must be greater than 0, got -1.0"),
    ("--lr", "nan", "--lr must be greater than 0, got nan"),
    ("--lr-factor", "2", "--lr-factor must be between 0 and 1, got 2.0"),
    ("--max-pixels", "0", "--max-pixels must be at least 1, got 0"),
    ("--workers", "0", "--workers must be at least 1, got 0"),
    ("--keep-checkpoints", "-1", "--keep-checkpoints must be at least 0, got -1"),
    ("--width-shift-range", "1", "--width-shift-range must be at least 0 and less than 1"),
    ("--zoom-range", "-0.1", "--zoom-range must be at least 0 and less than 1, got -0.1"),
    ("--rotation-range", "-5", "--rotation-range must be at least 0 and at most 180"),
    ("--image-size", "8", "--image-size must be at least 16 and at most 1024 (the networks"),
    ("--seed", "-1", "--seed must be at least 0"),
    ("--test-size", "1.5", "--test-size must be between 0 and 1, got 1.5"),
    ("--val-size", "1", "--val-size must be at least 0 and less than 1, got 1.0"),
    ("--val-size", "0.9", "--val-size 0.9 and --test-size 0.15 leave no training images"),
])
def test_a_value_out_of_range_is_one_line_naming_flag_value_and_range(tmp_path, caplog, flag,
                                                                       value, message):
    dataset = tmp_path / "never_read"
    assert train.main(["--dataset", str(dataset), "--output", str(tmp_path / "out"),
                       flag, value]) == 2
    assert message in caplog.text
    assert "found" not in caplog.text and not (tmp_path / "out").exists()


def test_val_size_beside_a_validation_folder_is_refused(tmp_path, caplog):
    assert train.main(["--dataset", str(tmp_path), "--val-dir", str(tmp_path), "--val-size",
                       "0.1", "--output", str(tmp_path / "out")]) == 2
    assert "--val-dir is the validation part: drop --val-size" in caplog.text


def test_a_config_file_value_is_checked_like_the_flag(tmp_path, caplog):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"batch_size": 0}))
    assert train.main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "--batch-size must be at least 1, got 0" in caplog.text


def test_values_at_the_ends_of_their_ranges_are_taken():
    args = settings.parse_args(["--keep-checkpoints", "0", "--bn-momentum", "1",
                                "--zoom-range", "0", "--rotation-range", "180",
                                "--image-size", "16", "--min-lr", "0", "--seed", "0"])
    assert (args.keep_checkpoints, args.bn_momentum, args.image_size) == (0, 1.0, 16)


def test_predict_checks_its_values_before_loading_the_model(tmp_path, caplog):
    assert predict.main(["--image", "x.jpg", "--top-k", "0",
                         "--model", str(tmp_path / "none.keras")]) == 2
    assert "--top-k must be at least 1, got 0" in caplog.text and "train one" not in caplog.text


KEYS = st.sampled_from(sorted(vars(settings.parse_args([]))) + ["epoch", "config", "", "ü"])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(),
                   st.text(max_size=8), st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


@hypothesis_settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(KEYS, VALUES, max_size=4), st.sampled_from(["json", "yaml"]))
def test_any_config_file_gives_settings_or_one_clear_error(tmp_path, config, kind):
    path = tmp_path / f"run.{kind}"
    if kind == "json":
        path.write_text(json.dumps(config))
    else:
        import yaml
        path.write_text(yaml.safe_dump(config))
    try:
        args = settings.parse_args(["--config", str(path)])
    except UserError as error:
        assert "\n" not in str(error)
        return
    except SystemExit as stop:  # argparse's own refusal of a value's type or choice
        assert stop.code == 2
        return
    settings.check(args)  # what was taken is within every range
