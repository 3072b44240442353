"""The blog's callbacks, made to survive real runs and to resume (the run's folder and its
backups: run_folder.py).

ModelCheckpoint, ReduceLROnPlateau, TerminateOnNaN and BackupAndRestore below are Keras's,
each with what a long run on real data needs added (the docstrings say what).
"""

import glob
import json
import os

import keras
import numpy as np

from classifier import artifacts
from classifier.run_folder import finite_losses

# {prefix}: VGG for the blog's network, as the blog named its checkpoints; else the network.
CHECKPOINT_PATTERN = "{prefix}_epoch-{{epoch:02d}}_loss-{{loss:.4f}}_val_loss-{{val_loss:.4f}}.keras"


def checkpoint_prefix(network):
    return "VGG" if network == "vgg" else network


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's ModelCheckpoint into folder, named by CHECKPOINT_PATTERN, that only considers
    every `every`-th epoch and keeps the newest `keep` files (0: all). Keras 3 removed
    `period`, and its integer save_freq counts batches, when val_loss (part of the file name)
    is not known yet. Each file is written under a temporary name and renamed when complete
    (artifacts.atomic_path), so a crash mid-write leaves no truncated model in the folder."""

    def __init__(self, folder, network, every, keep, **kwargs):
        self.prefix = checkpoint_prefix(network)
        self.pattern = os.path.join(folder, CHECKPOINT_PATTERN.format(prefix=self.prefix))
        super().__init__(self.pattern, **kwargs)
        self.folder, self.every, self.keep = folder, every, keep

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if (epoch + 1) % self.every or not finite_losses(logs):
            return  # a NaN model never replaces the last good checkpoint
        with artifacts.atomic_path(self.pattern.format(epoch=epoch + 1, **logs)) as temporary:
            self.filepath = temporary  # Keras decides whether to save (best only), and saves
            try:
                super().on_epoch_end(epoch, logs)
            finally:
                self.filepath = self.pattern
        if self.keep:
            pattern = os.path.join(self.folder, f"{self.prefix}_epoch-*.keras")
            # Newest by time written, then by name: one run's files written within one tick.
            written = sorted(glob.glob(pattern), key=lambda path: (os.path.getmtime(path), path))
            for old in written[:-self.keep]:
                os.remove(old)


class ReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """Keras's ReduceLROnPlateau, whose patience bookkeeping survives a restart:
    BackupAndRestore brings back the weights and the optimizer (learning rate included), this
    brings back how long val_loss has stalled from state_path, so a resumed run lowers the
    rate when the original would."""

    def __init__(self, state_path, **kwargs):
        super().__init__(**kwargs)
        self.state_path = state_path
        self.restored = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self.restored and os.path.exists(self.state_path):
            with open(self.state_path) as handle:
                state = json.load(handle)
            if state.pop("next_epoch") == epoch:
                vars(self).update(state)
        self.restored = True

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        artifacts.write_json(self.state_path, {
            "next_epoch": epoch + 1, "best": float(self.best), "wait": self.wait,
            "cooldown_counter": self.cooldown_counter})


class TerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """Keras's TerminateOnNaN watches the training loss of each batch. With a far too high
    learning rate that loss can stay finite (huge) while the weights are already broken, so
    this one also stops when the validation loss of an epoch is NaN or infinite."""

    def on_epoch_end(self, epoch, logs=None):
        if not np.isfinite((logs or {}).get("val_loss", 0.0)):
            self.model.stop_training = True


class LearningRateLog(keras.callbacks.Callback):
    """Puts the optimizer's learning rate into each epoch's logs, for history.csv and
    TensorBoard, as ReduceLROnPlateau does where it runs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, for a run that calls fit more than once (fine_tuning.py): the
    epoch it restores stays on the model after fit (model._initial_epoch), and would make the
    next fit start there, even where that fit's own backup has nothing to restore."""

    def on_train_begin(self, logs=None):
        self.model._initial_epoch = None
        super().on_train_begin(logs)


class SaveWeightsAtEnd(keras.callbacks.Callback):
    """Saves the model's weights to path when fit ends, complete (not when interrupted)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, logs=None):
        with artifacts.atomic_path(self.path) as temporary:
            self.model.save_weights(temporary)


def early_stopping(patience):
    """Keras's EarlyStopping on val_loss, keeping the best epoch's weights, as a list: empty
    when patience is 0, as in the blog."""
    if not patience:
        return []
    return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                          restore_best_weights=True, verbose=1)]
