"""The output folder of a training run: one run at a time in it, its folders, the point an
interrupted run resumes from, and the history of its epochs.

An interrupted run resumes from Keras's BackupAndRestore in <output>/backup/, which holds the
weights, the optimizer and the epoch; run.json there holds the settings it was started with
and its run name, plateau.json ReduceLROnPlateau's patience count. A run that fine-tunes in
two phases (fine_tuning.py) backs its first phase up in backup/head/ and, once that phase is
complete, keeps its weights in backup/head.weights.h5 until the second phase has a backup of
its own. history.csv (CSVLogger) keeps every epoch's metrics.
"""

import contextlib
import csv
import fcntl
import json
import logging
import os
import shutil
import time

import numpy as np

from classifier import artifacts
from classifier.cli import TrainingDiverged, UserError

log = logging.getLogger("train")

CHECKPOINTS = "checkpoints"
HISTORY_FILE = "history.csv"
BACKUP_DIR = "backup"
HEAD_BACKUP_DIR = os.path.join(BACKUP_DIR, "head")
HEAD_WEIGHTS = os.path.join(BACKUP_DIR, "head.weights.h5")
LOCK_FILE = ".lock"
# Settings that may change between an interrupted run and its resumption.
NOT_RESUME_RELEVANT = {"epochs", "run_name", "fresh", "verbose", "workers", "logs", "cache_dir",
                       "no_cache", "data_mode", "config", "early_stopping", "strategy", "devices",
                       "worker_addresses", "worker_index", "check_only", "find_label_issues",
                       "label_issue_folds", "label_issue_epochs", "tune", "tune_trials"}


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
    """Create the output folders up front, so a bad location fails now, not after training;
    logs None: a run that trains nothing (--check-only), with no checkpoints either."""
    for folder in (output,) if logs is None else (output, os.path.join(output, CHECKPOINTS),
                                                  logs):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create {folder}: {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"cannot write to {folder}")


def check_free_space(model, output, epochs, keep_checkpoints):
    """Fail before training, not after it, when the output disk cannot hold the files."""
    per_model = model.count_params() * 4 * 3  # weights plus Adam's two moments, float32
    copies = min(keep_checkpoints or epochs, epochs) + 3  # + final, 2 backups
    free = shutil.disk_usage(output).free
    if free < per_model * copies:
        raise UserError(
            f"only {free / 1e6:.0f} MB free for {output}, about "
            f"{per_model * copies / 1e6:.0f} MB needed (fewer with --keep-checkpoints)")


def resume_point(settings, run_name, fresh, output, head_epochs):
    """The interrupted run in output to resume, as (its run name, the first epoch to
    train), or (run_name, 0) to start afresh. settings are the run's resume_settings; head_epochs, where the run
    fine-tunes in two phases, the length of the first (else 0).

    The backup folder remembers the settings it was made with; resuming with other settings
    would silently mix two experiments, so that is refused.
    """
    backup_dir = os.path.join(output, BACKUP_DIR)
    run_file = os.path.join(backup_dir, "run.json")
    if fresh:
        shutil.rmtree(backup_dir, ignore_errors=True)
    if not os.path.exists(run_file):
        os.makedirs(backup_dir, exist_ok=True)
        artifacts.write_json(run_file, {"settings": settings, "run_name": run_name})
        return run_name, 0
    with open(run_file) as handle:
        run = json.load(handle)
    if run["settings"] != settings:
        changed = sorted(key for key, value in settings.items()
                         if run["settings"].get(key) != value)
        raise UserError(
            f"{backup_dir} holds an interrupted run with other settings ({', '.join(changed)}): "
            "run it again with the same flags to resume, or add --fresh to start over")
    epoch = _backed_up_epoch(os.path.join(output, BACKUP_DIR))
    if epoch is None:
        epoch = (head_epochs if os.path.exists(os.path.join(output, HEAD_WEIGHTS))
                 else _backed_up_epoch(os.path.join(output, HEAD_BACKUP_DIR)) or 0)
    log.info("resuming the interrupted run %s after epoch %d (--fresh starts over)",
             run["run_name"], epoch)
    return run["run_name"], epoch


def _backed_up_epoch(backup_dir):
    metadata = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(metadata):
        return None
    with open(metadata) as handle:
        return json.load(handle)["epoch"]


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


def finite_losses(logs):
    return all(np.isfinite(logs.get(key, 0.0)) for key in ("loss", "val_loss"))


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
