"""The blog's callbacks, made to survive real runs, and the state that lets a run resume.

ModelCheckpoint, ReduceLROnPlateau and TerminateOnNaN below are Keras's, each with what a
long run on real data needs added (the docstrings say what). An interrupted run resumes from
Keras's BackupAndRestore in <output>/backup/, which holds the weights, the optimizer and the
epoch; run.json there holds the settings it was started with and its run name, plateau.json
ReduceLROnPlateau's patience count. history.csv (CSVLogger) keeps every epoch's metrics.
"""

import contextlib
import csv
import fcntl
import glob
import json
import os
import shutil
import time

import keras
import numpy as np

from classifier import artifacts
from classifier.cli import TrainingDiverged, UserError

CHECKPOINT_PATTERN = "VGG_epoch-{epoch:02d}_loss-{loss:.4f}_val_loss-{val_loss:.4f}.keras"
CHECKPOINTS = "checkpoints"
HISTORY_FILE = "history.csv"
BACKUP_DIR = "backup"
LOCK_FILE = ".lock"
# Settings that may change between an interrupted run and its resumption.
NOT_RESUME_RELEVANT = {"epochs", "run_name", "fresh", "verbose", "workers", "logs", "cache_dir",
                       "no_cache", "data_mode", "config", "early_stopping", "strategy", "devices",
                       "worker_addresses", "worker_index"}


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's ModelCheckpoint into folder, named by CHECKPOINT_PATTERN, that only considers
    every `every`-th epoch and keeps the newest `keep` files (0: all). Keras 3 removed
    `period`, and its integer save_freq counts batches, when val_loss (part of the file name)
    is not known yet. Each file is written under a temporary name and renamed when complete
    (artifacts.atomic_path), so a crash mid-write leaves no truncated model in the folder."""

    def __init__(self, folder, every, keep, **kwargs):
        self.pattern = os.path.join(folder, CHECKPOINT_PATTERN)
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
            pattern = os.path.join(self.folder, "VGG_epoch-*.keras")
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


def early_stopping(patience):
    """Keras's EarlyStopping on val_loss, keeping the best epoch's weights, as a list: empty
    when patience is 0, as in the blog."""
    if not patience:
        return []
    return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                          restore_best_weights=True, verbose=1)]


def finite_losses(logs):
    return all(np.isfinite(logs.get(key, 0.0)) for key in ("loss", "val_loss"))


@contextlib.contextmanager
def output_lock(output):
    """Hold output/.lock, an advisory lock of the operating system, for the block: one run
    per output folder. A second run stops at once, naming the first. The lock dies with its
    process (kill -9 included), so a crashed run leaves none behind."""
    try:
        os.makedirs(output, exist_ok=True)
        handle = open(os.path.join(output, LOCK_FILE), "a+", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot create {output}: {error.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{output} is in use by another training run ({holder}): wait "
                            "for it to end, or give this one another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield


def prepare_folders(output, logs):
    """Create the output folders up front, so a bad location fails now, not after training."""
    for folder in (output, os.path.join(output, CHECKPOINTS), logs):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create {folder}: {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"cannot write to {folder}")


def check_free_space(model, args, output):
    """Fail before training, not after it, when the output disk cannot hold the files."""
    per_model = model.count_params() * 4 * 3  # weights plus Adam's two moments, float32
    copies = min(args.keep_checkpoints or args.epochs, args.epochs) + 3  # + final, 2 backups
    free = shutil.disk_usage(output).free
    if free < per_model * copies:
        raise UserError(
            f"only {free / 1e6:.0f} MB free for {output}, about "
            f"{per_model * copies / 1e6:.0f} MB needed (fewer with --keep-checkpoints)")


def resume_point(args, output):
    """The interrupted run in output to resume, as (run name, first epoch), or None to start
    afresh as args.run_name.

    The backup folder remembers the settings it was made with; resuming with other settings
    would silently mix two experiments, so that is refused.
    """
    backup_dir = os.path.join(output, BACKUP_DIR)
    run_file = os.path.join(backup_dir, "run.json")
    settings = resume_settings(args)
    if args.fresh:
        shutil.rmtree(backup_dir, ignore_errors=True)
    if not os.path.exists(run_file):
        os.makedirs(backup_dir, exist_ok=True)
        artifacts.write_json(run_file, {"settings": settings, "run_name": args.run_name})
        return None
    with open(run_file) as handle:
        run = json.load(handle)
    if run["settings"] != settings:
        changed = sorted(key for key, value in settings.items()
                         if run["settings"].get(key) != value)
        raise UserError(
            f"{backup_dir} holds an interrupted run with other settings ({', '.join(changed)}): "
            "run it again with the same flags to resume, or add --fresh to start over")
    epoch = 0
    metadata = os.path.join(backup_dir, "training_metadata.json")
    if os.path.exists(metadata):
        with open(metadata) as handle:
            epoch = json.load(handle)["epoch"]
    return run["run_name"], epoch


def resume_settings(args):
    return {key: value for key, value in vars(args).items() if key not in NOT_RESUME_RELEVANT}


def read_history(output):
    """Per-epoch metrics from history.csv: every epoch, also those before a resume."""
    rows = {}
    path = os.path.join(output, HISTORY_FILE)
    if not os.path.exists(path):  # stopped before the first epoch ended
        return {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if None in row.values() or "" in row.values():
                continue  # a line cut short by a crash while it was being written
            rows[int(row["epoch"])] = row  # a repeated epoch (resumed mid-way): keep the last
    keys = next(iter(rows.values())).keys() if rows else []
    return {key: [float(rows[epoch][key]) for epoch in sorted(rows)] for key in keys}


def raise_if_diverged(history, output, lr):
    """After training: when the last epoch's losses are NaN or infinite, drop the broken
    backup, so the next run starts afresh, and raise TrainingDiverged with advice."""
    epochs_run = len(history.get("loss", []))
    if epochs_run and not finite_losses({key: values[-1] for key, values in history.items()}):
        shutil.rmtree(os.path.join(output, BACKUP_DIR), ignore_errors=True)
        raise TrainingDiverged(
            f"the loss became NaN or infinite in epoch {epochs_run}, and TerminateOnNaN stopped "
            f"training: try a lower learning rate than --lr {lr}. The last good checkpoint, if "
            f"any, is in {os.path.join(output, CHECKPOINTS)}")
