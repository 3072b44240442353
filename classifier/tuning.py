"""--tune MINUTES: a search, by Optuna, over the settings that matter most for a small folder
(learning rate, augmentation strength, label smoothing, image size, network), scored on the
validation part only, within a wall-time budget; successive halving stops poor trials early.

The search lives in <output>/tuning/search.journal (Optuna's journal storage, appended trial
by trial), so a search killed and started again continues where it stopped; the run's own
lock keeps two searches out of one folder. Its first trial is the recipe's own settings, so
the choice is never worse on the validation part than not searching.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time

import keras
import numpy as np
import optuna
import tensorflow as tf

from classifier.search_space import Space, describe
from classifier.cli import UserError

log = logging.getLogger("tuning")

FOLDER = "tuning"
JOURNAL = "search.journal"
REDUCTION = 3  # successive halving keeps the best third of the trials at each rung
# The first verdict comes after a quarter of the epochs: after one or two, every trial
# (the recipe's own too) still scores near chance, and halving on that is halving on noise.
FIRST_RUNG = 1 / 4
RANDOM_TRIALS = 5  # before Optuna's TPE sampler models what it has seen


def check_budget(minutes, seconds_per_trial, epochs):
    """Refuse a budget that cannot hold one trial (the recipe's own settings, for --epochs
    epochs), seconds_per_trial being its time at the least."""
    if minutes * 60 < seconds_per_trial:
        needed = math.ceil(seconds_per_trial / 60)
        raise UserError(f"--tune {minutes:g}: one trial of {epochs} epochs takes about "
                        f"{needed} min here: give --tune {max(needed * 3, needed + 1)} or "
                        "more (three trials at the least), or fewer --epochs")


def seconds_per_step(model, image_size, batch_size, classes, steps=3):
    """The median seconds of one training step of model on random images, after the first
    (which traces): the least a trial's steps will take."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, image_size, image_size, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, batch_size), classes)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


class Trial(keras.callbacks.Callback):
    """Reports each epoch's validation score to Optuna, and stops training when successive
    halving prunes the trial or the budget's deadline passes."""

    def __init__(self, trial, monitor, deadline, on_epoch, epochs):
        super().__init__()
        self.trial, self.monitor, self.deadline, self.on_epoch = trial, monitor, deadline, on_epoch
        self.epochs = epochs
        self.scores, self.stopped = [], None

    def on_train_batch_end(self, batch, logs=None):
        if time.monotonic() > self.deadline:
            self.stopped = "out of time"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped:  # the epoch was cut short: its score is not comparable
            return
        score = float(logs[self.monitor])
        self.scores.append(score)
        self.trial.report(score, epoch + 1)
        self.on_epoch()
        # A trial that has run all its epochs is complete: halving it now would save nothing.
        if epoch + 1 < self.epochs and self.trial.should_prune():
            self.stopped = "pruned"
            self.model.stop_training = True


@dataclasses.dataclass
class Search:
    """A search's outcome: every trial (tuning_report writes them), the chosen one, the one
    of the recipe's own settings, and what was searched."""
    trials: list  # dicts: number, state, settings, score, epochs, seconds, finished, baseline
    chosen: dict
    space: Space
    budget_minutes: float
    seconds: float
    monitor: str

    @property
    def baseline(self):
        """The trial of the recipe's own settings that ran (None before it did)."""
        return next((trial for trial in self.trials
                     if trial["baseline"] and trial["state"] != "interrupted"), None)

    def config(self):
        """What config.json records of the search."""
        baseline_ = self.baseline
        return {"budget_minutes": self.budget_minutes, "seconds": round(self.seconds, 1),
                "score": self.monitor, "searched": self.space.searched(),
                "trials": len(self.trials),
                "complete": sum(trial["state"] == "complete" for trial in self.trials),
                "chosen": {key: self.chosen[key] for key in ("number", "settings", "score")},
                "baseline_score": baseline_ and baseline_["score"]}


def fingerprint(values):
    """A short digest of what makes a search the same search (settings and images)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def open_study(folder, fresh, seed, epochs, print_):
    """The Optuna study of <folder>/search.journal, created or reloaded; fresh deletes an
    earlier one. print_, the search's fingerprint: a different search refuses to continue
    another's trials."""
    if fresh and os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(os.path.join(folder, JOURNAL)))
    study = optuna.create_study(
        study_name="search", storage=storage, direction="maximize", load_if_exists=True,
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=math.ceil(epochs * FIRST_RUNG), reduction_factor=REDUCTION))
    # Seeded by the trials so far: a resumed search must not draw its first trials again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials),
                                               n_startup_trials=RANDOM_TRIALS)
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", print_)
    elif known != print_:
        raise UserError(f"{folder} holds a search of other settings or images: run the same "
                        "command as it did, or add --fresh to start over")
    requeue_interrupted(study)
    return study


def requeue_interrupted(study):
    """A trial that a kill left running, or that Ctrl-C / SIGTERM failed, runs again with
    the same settings (next, before any new one)."""
    requeued = study.user_attrs.get("requeued", [])
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.RUNNING:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        elif not (trial.state == optuna.trial.TrialState.FAIL
                  and trial.user_attrs.get("interrupted")) or trial.number in requeued:
            continue
        requeued.append(trial.number)
        if "settings" not in trial.user_attrs:  # killed before it drew them: nothing lost
            continue
        study.enqueue_trial(trial.params,
                            user_attrs={"baseline": trial.user_attrs.get("baseline", False)})
        log.info("trial %d was interrupted: it runs again", trial.number)
    study.set_user_attr("requeued", requeued)


def search(train_trial, make_space, first, folder, budget_minutes, max_trials, seed, epochs,
           monitor, print_, fresh=False):
    """Run the search: train_trial(settings, callback) trains one model with settings and
    the Keras callback given (which reports and stops it) on the training part, scored by
    monitor on the validation part. make_space() gives the Space of a new search (a resumed
    one keeps its own); first(space) the settings of its first trial, the recipe's own.
    Continues an interrupted search of folder; a finished one is read back. Returns a
    Search."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial: ours
    study = open_study(folder, fresh, seed, epochs, print_)
    space_ = stored_space(study, make_space)
    spent = study.user_attrs.get("seconds", 0.0)
    started = time.monotonic() - spent
    if "chosen" in study.user_attrs:
        log.info("the search in %s has chosen already: its choice is taken (--fresh searches "
                 "again)", folder)
    else:
        if not study.trials:
            study.enqueue_trial({key: value for key, value in first(space_).items()
                                 if key in space_.searched()}, user_attrs={"baseline": True})
        done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                            optuna.trial.TrialState.PRUNED)))
        if done:
            log.info("continuing the search: %d trials done, %.1f of %g min spent", done,
                     spent / 60, budget_minutes)
        objective = Objective(study, space_, train_trial, started, budget_minutes, epochs,
                              monitor)
        remaining = objective.deadline - time.monotonic()
        trials_left = max_trials - done if max_trials else None
        if remaining > 0 and (trials_left is None or trials_left > 0):
            study.optimize(objective, n_trials=trials_left, timeout=remaining)
        if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            raise UserError(f"--tune {budget_minutes:g}: no trial finished within the budget: "
                            "give more minutes, or fewer --epochs")
        study.set_user_attr("chosen", study.best_trial.number)
    requeued = set(study.user_attrs.get("requeued", []))
    trials = [row(trial, trial.number in requeued) for trial in study.trials
              if trial.state.is_finished() and "settings" in trial.user_attrs]
    chosen = next(trial for trial in trials if trial["number"] == study.user_attrs["chosen"])
    log.info("search: trial %d chosen of %d (%s), %s %.4f", chosen["number"], len(trials),
             describe(chosen["settings"]), monitor, chosen["score"])
    return Search(trials, chosen, space_, budget_minutes, study.user_attrs.get("seconds", 0.0),
                  monitor)


def stored_space(study, make_space):
    """The study's Space: the one it was started with (an offline rerun is the same
    search), or make_space()'s for a new one."""
    if "space" in study.user_attrs:
        return Space(**{name: tuple(values)
                        for name, values in study.user_attrs["space"].items()})
    space_ = make_space()
    study.set_user_attr("space", dataclasses.asdict(space_))
    return space_


@dataclasses.dataclass
class Objective:
    """One trial for study.optimize: draw its settings, train them (train_trial, see
    search), record its time in the journal; its score, or TrialPruned when halving, the
    deadline or the memory stopped it."""
    study: optuna.Study
    space: Space
    train_trial: object
    started: float  # time.monotonic() when the search began, its earlier sessions counted
    budget_minutes: float
    epochs: int
    monitor: str

    @property
    def deadline(self):
        return self.started + self.budget_minutes * 60

    def save_time(self):
        self.study.set_user_attr("seconds", time.monotonic() - self.started)

    def __call__(self, trial):
        settings = self.space.suggest(trial)  # an enqueued trial's: the enqueued ones
        trial.set_user_attr("settings", settings)
        trial_started = time.monotonic()
        described = describe(settings)
        log.info("starting trial %d: %s (%.1f of %g min left)", trial.number, described,
                 (self.deadline - trial_started) / 60, self.budget_minutes)
        callback = Trial(trial, self.monitor, self.deadline, self.save_time, self.epochs)
        try:
            self.train_trial(settings, callback)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            self.save_time()
            raise
        except tf.errors.ResourceExhaustedError:
            callback.stopped = "out of memory"
        seconds = time.monotonic() - trial_started
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("finished", time.monotonic() - self.started)
        self.save_time()
        if callback.stopped or not callback.scores:
            trial.set_user_attr("stopped", callback.stopped or "out of time")
            log.info("trial %d (%s): stopped after %d epochs (%s), %.0f s", trial.number,
                     described, len(callback.scores), callback.stopped, seconds)
            raise optuna.TrialPruned()
        log.info("trial %d (%s): %s %.4f after %d epochs, %.0f s", trial.number, described,
                 self.monitor, callback.scores[-1], len(callback.scores), seconds)
        return callback.scores[-1]


def row(trial, interrupted):
    """One finished trial, as tuning_report shows it; interrupted: a kill cut it short, and
    it ran again."""
    state = {optuna.trial.TrialState.COMPLETE: "complete",
             optuna.trial.TrialState.PRUNED: trial.user_attrs.get("stopped", "pruned"),
             optuna.trial.TrialState.FAIL: "interrupted" if interrupted else "failed"}[
        trial.state]
    scores = trial.intermediate_values
    return {"number": trial.number, "state": state, "settings": trial.user_attrs["settings"],
            "score": (trial.value if trial.value is not None
                      else scores[max(scores)] if scores else None),
            "epochs": max(scores) if scores else 0,
            "seconds": trial.user_attrs.get("seconds"),
            "finished": trial.user_attrs.get("finished"),
            "baseline": trial.user_attrs.get("baseline", False)}
