"""What training minimises and how: the loss, the optimizer, the learning rate over a run, and
the range test that suggests one (--lr-find).

With --schedule plateau (the blog's) the optimizer gets --lr and ReduceLROnPlateau lowers it
(callbacks.py). With --schedule onecycle it gets a schedule of the optimizer's own step
count: a linear warm-up from --lr/25 to --lr, then cosine annealing to 0 at the last step.
BackupAndRestore brings the step count back with the optimizer, so a resumed run follows
the very same rates as an uninterrupted one.
"""

import os
from dataclasses import dataclass

import keras
import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display
import matplotlib.pyplot as plt
import numpy as np

from classifier import artifacts

WARMUP_START = 1 / 25  # of the peak: where one cycle's warm-up starts, as fastai's
PLOT = "lr_find.png"
SKIPPED = 10


def learning_rate(schedule, lr, epochs, warmup_epochs, steps_per_epoch):
    """What the optimizer is given for epochs epochs: lr (schedule "plateau"), or the one
    cycle (schedule "onecycle") that peaks at lr over those epochs."""
    if schedule == "plateau":
        return lr
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr * WARMUP_START, decay_steps=total - warmup, alpha=0.0,
        warmup_target=lr, warmup_steps=warmup)


def loss_and_metrics(multi_label, label_smoothing, threshold):
    """What compile is given: the blog's cross-entropy (binary for multi-label), with
    --label-smoothing, and accuracy."""
    if multi_label:
        # Keras would also call this "accuracy"; it is the share of right yes/no label
        # decisions, not of images with every label right (that one is in the report).
        loss, metrics = keras.losses.BinaryCrossentropy, [keras.metrics.BinaryAccuracy(
            name="binary_accuracy", threshold=threshold)]
    else:
        loss, metrics = keras.losses.CategoricalCrossentropy, ["accuracy"]
    if label_smoothing:
        return loss(label_smoothing=label_smoothing), metrics
    # The blog's name of its loss.
    return ("binary_crossentropy" if multi_label else "categorical_crossentropy"), metrics


def optimizer(kind, learning_rate, weight_decay):
    """--optimizer: Adam (the blog's), or AdamW with decoupled weight decay."""
    if kind == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate=learning_rate)


@dataclass
class RangeTest:
    """The learning rates tried, and the smoothed training loss after each."""
    rates: list
    losses: list

    def suggestion(self):
        """A tenth of the learning rate at the lowest smoothed loss, as fastai's lr_min; the
        first SKIPPED steps, where the average is still mostly its first losses, aside."""
        start = SKIPPED if len(self.losses) > SKIPPED else 0
        return self.rates[start + int(np.argmin(self.losses[start:]))] / 10


def range_test(model, batches, steps=300, start=1e-7, end=10.0, smoothing=0.98, explode=4.0):
    """The learning-rate range test (Leslie Smith's, fastai's lr_find) on a compiled model:
    one training step per batch of batches, at learning rates growing exponentially from
    start to end over steps steps, until the smoothed loss passes explode times its lowest
    or is no longer finite."""
    factor = (end / start) ** (1 / (steps - 1))
    test, average = RangeTest([], []), 0.0
    for step, (images, targets) in zip(range(steps), batches):
        model.optimizer.learning_rate = start * factor ** step
        loss = float(model.train_on_batch(images, targets, return_dict=True)["loss"])
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (step + 1))  # without the start's bias to 0
        if not np.isfinite(smoothed):
            break
        test.rates.append(start * factor ** step)
        test.losses.append(smoothed)
        if smoothed > explode * min(test.losses):
            break
    return test


def find_learning_rate(model, batches, output):
    """--lr-find: the range test on a compiled model, and its plot; returns both."""
    test = range_test(model, batches)
    return test, save_range_test(test, output)


def save_range_test(test, output):
    """lr_find.png: the smoothed loss against the learning rate, the suggestion marked."""
    figure, axes = plt.subplots(figsize=(8, 5), layout="constrained")
    axes.plot(test.rates, test.losses)
    axes.set_xscale("log")
    axes.axvline(test.suggestion(), color="tab:red", linestyle="--",
                 label=f"suggested --lr {test.suggestion():.2g}")
    # From the lowest loss to a little above the first: the explosion runs off the top.
    axes.set_ylim(min(test.losses) * 0.95, test.losses[0] * 1.3)
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("training loss (smoothed)")
    axes.set_title("Learning-rate range test")
    axes.legend()
    axes.grid(alpha=0.3)
    path = os.path.join(output, PLOT)
    with artifacts.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return path
