"""Training that starts from what a network already knows, as Keras's transfer-learning
guide teaches it: first the new output layer alone, on a frozen network, then the whole
network at a lower learning rate, BatchNormalization kept in inference mode throughout (a
frozen BatchNormalization layer runs in inference mode in Keras 3), so that its statistics,
learnt on far more images, are not overwritten by those of a few small batches.

A run is a list of phases, each one call of fit with its own trainable layers, optimizer and
learning-rate schedule; a run without pretrained weights is one phase that trains everything,
as the blog's does.
"""

import logging
import os
from dataclasses import dataclass

import keras

from classifier import artifacts, calibration, networks, run_folder
from classifier.cli import UserError

log = logging.getLogger("fine_tuning")

OUTPUT_LAYER, ACTIVATION = networks.OUTPUT_LAYER, networks.ACTIVATION


@dataclass(frozen=True)
class Phase:
    """Epochs start to end (exclusive) of a run, what they train ("all", "head": the output
    layer alone, "all-but-batchnorm"), at which learning rate (the peak of a one-cycle
    schedule), and the backup folder that lets them resume (relative to the output)."""
    name: str
    start: int
    end: int
    trains: str
    lr: float
    backup: str

    @property
    def epochs(self):
        return self.end - self.start


def plan(pretrained, new_head, epochs, head_epochs, lr, fine_tune_lr):
    """The phases of a run of epochs: one that trains everything at lr without pretrained
    weights; with them, head_epochs of the new output layer (new_head) at lr, then the rest of
    the network too at fine_tune_lr. The last phase backs up into backup/, whose removal at
    its end marks a complete run; a first phase before it into backup/head/."""
    if not pretrained:
        return [Phase("train", 0, epochs, "all", lr, run_folder.BACKUP_DIR)]
    head_end = min(head_epochs, epochs) if new_head else 0
    phases = []
    if head_end:
        phases.append(Phase("head", 0, head_end, "head", lr, run_folder.BACKUP_DIR
                            if head_end == epochs else run_folder.HEAD_BACKUP_DIR))
    if head_end < epochs:
        phases.append(Phase("fine-tune", head_end, epochs, "all-but-batchnorm", fine_tune_lr,
                            run_folder.BACKUP_DIR))
    return phases


def head_epochs(phases):
    """Where a two-phase run's second phase starts (0 for a run of one phase)."""
    return phases[1].start if len(phases) > 1 else 0


def set_trainable(model, trains):
    """Freeze and unfreeze the model's layers for a phase's trains; compile afterwards."""
    for layer in model.layers:
        if trains == "all":
            layer.trainable = True
        elif trains == "head":
            layer.trainable = layer.name == OUTPUT_LAYER
        else:
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def begin(model, phase, phases, first_epoch, output):
    """Make model ready for phase, before it is compiled: its trainable layers, and where a
    resumed run starts at the second phase, the weights the first ended with."""
    set_trainable(model, phase.trains)
    if phase.start == first_epoch > 0 and phase is not phases[0]:
        model.load_weights(os.path.join(output, run_folder.HEAD_WEIGHTS))
    if phase.name != "train":
        log.info("%s: epochs %d to %d at --lr %g, training %d weights", phase.name,
                 phase.start + 1, phase.end, phase.lr,
                 sum(int(weight.numpy().size) for weight in model.trainable_weights))


def start_from(path, classes, multi_label, policy):
    """The model trained here before at path, without its temperature, in this run's dtype
    policy, and whether it got a new output layer: it does unless its labels.json lists the same classes in the same order
    and it is multi-label exactly when this run is."""
    earlier = artifacts.load_model(path)
    info = artifacts.load_info(path) or {}
    same = (info.get("classes") == list(classes)
            and info.get("multi_label", False) == multi_label)
    if same:
        # The temperature suited the earlier training; this run fits its own.
        earlier = calibration.with_temperature(earlier, None, multi_label)
    else:
        try:
            features = earlier.get_layer(OUTPUT_LAYER).input
        except ValueError:
            raise UserError(f"{path} has no layer named {OUTPUT_LAYER!r} to replace: it was "
                            "not trained by this project") from None
        x = keras.layers.Dense(len(classes), name=OUTPUT_LAYER)(features)
        outputs = keras.layers.Activation("sigmoid" if multi_label else "softmax",
                                          dtype="float32", name=ACTIVATION)(x)
        earlier = keras.Model(earlier.input, outputs, name=earlier.name)
    return networks.with_dtype_policy(earlier, policy), not same
