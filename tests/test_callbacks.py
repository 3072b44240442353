"""The callbacks on their own: checkpoints written whole or not at all, kept by number and
period, a plateau count that survives a restart, a history that survives a crash."""

import errno
import os

import keras
import numpy as np
import pytest

from classifier import callbacks, run_folder


def tiny_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.1), loss="mse")
    return model


def checkpoint(folder, **options):
    saver = callbacks.ModelCheckpoint(str(folder), "vgg", **options)
    saver.set_model(tiny_model())
    saver.on_train_begin()
    return saver


def test_reduce_lr_on_plateau_resumes_its_patience_count(tmp_path):
    state = str(tmp_path / "plateau.json")
    model = tiny_model()

    def callback():
        plateau = callbacks.ReduceLROnPlateau(state, monitor="val_loss", factor=0.5, patience=2)
        plateau.set_model(model)
        plateau.on_train_begin()
        return plateau

    first = callback()
    for epoch, val_loss in enumerate([1.0, 1.1]):  # one epoch without improvement
        first.on_epoch_begin(epoch)
        first.on_epoch_end(epoch, {"val_loss": val_loss})
    resumed = callback()  # a new process: the count starts from the saved state
    resumed.on_epoch_begin(2)
    resumed.on_epoch_end(2, {"val_loss": 1.2})  # the second: patience 2 is used up
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)


def test_a_history_line_cut_short_by_a_crash_is_ignored(tmp_path):
    (tmp_path / "history.csv").write_text(
        "epoch,loss,val_loss\n0,1.5,1.6\n1,1.2,1.3\n1,1.1,1.2\n2,0.9")
    history = run_folder.read_history(str(tmp_path))
    assert history == {"epoch": [0.0, 1.0], "loss": [1.5, 1.1], "val_loss": [1.6, 1.2]}


def test_checkpoints_carry_the_epoch_and_losses_every_nth_epoch_and_the_newest_are_kept(
        tmp_path):
    saver = checkpoint(tmp_path, every=2, keep=2, monitor="val_loss", save_best_only=False)
    for epoch in range(8):
        saver.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_loss": 2.0})
    assert sorted(os.listdir(tmp_path)) == [
        "VGG_epoch-06_loss-0.1667_val_loss-2.0000.keras",
        "VGG_epoch-08_loss-0.1250_val_loss-2.0000.keras"]


def test_best_only_and_nan_epochs_write_no_checkpoint(tmp_path):
    saver = checkpoint(tmp_path, every=1, keep=0, monitor="val_loss", save_best_only=True)
    for epoch, val_loss in enumerate([1.0, 1.5, float("nan"), 0.5]):
        saver.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
    assert sorted(os.listdir(tmp_path)) == ["VGG_epoch-01_loss-1.0000_val_loss-1.0000.keras",
                                            "VGG_epoch-04_loss-1.0000_val_loss-0.5000.keras"]


def test_checkpoints_appear_only_when_complete(tmp_path, monkeypatch):
    def cut_short(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    saver = checkpoint(tmp_path, every=1, keep=5, monitor="val_loss", save_best_only=False)
    monkeypatch.setattr(keras.Model, "save", cut_short)
    with pytest.raises(OSError):
        saver.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0})
    assert os.listdir(tmp_path) == []


def test_a_diverged_run_drops_its_backup_and_says_what_to_do(tmp_path):
    (tmp_path / run_folder.BACKUP_DIR).mkdir()
    run_folder.raise_if_diverged({"loss": [1.0, 0.5]}, str(tmp_path), 0.1)  # finite: no error
    with pytest.raises(run_folder.TrainingDiverged, match="lower learning rate than --lr 0.1"):
        run_folder.raise_if_diverged({"loss": [1.0, np.nan]}, str(tmp_path), 0.1)
    assert not (tmp_path / run_folder.BACKUP_DIR).exists()
