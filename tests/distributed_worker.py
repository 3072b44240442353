"""Runs train.py's training in its own process for tests/test_distributed.py and saves the
trained weights (BatchNormalization statistics included) and optimizer state to a .npz file,
which the workers other than the chief otherwise keep to themselves.

    python tests/distributed_worker.py STATE.npz [--one-step] [--logical-cpus N] -- FLAGS

FLAGS are train.py's. --one-step saves the state after the first training step, computed
so that one process and several replicas can be compared to 1e-6: without Dropout, whose
masks are drawn per replica, and in float64. In float32 the untrained network's
BatchNormalization over a few images amplifies the rounding of partial sums (8 images
against 4 + 4) to about 1e-4 of the gradients, and Adam's first step moves each weight by
+-lr by the sign of its gradient, which rounding flips where the gradient is about 0.
--logical-cpus splits the CPU into N devices, for a MirroredStrategy without GPUs.
"""

import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from classifier import networks  # noqa: E402


class SaveState(keras.callbacks.Callback):
    def __init__(self, path, one_step):
        super().__init__()
        self.path, self.one_step = path, one_step

    def save(self):
        state = self.model.weights + self.model.optimizer.variables
        np.savez(self.path, *[variable.numpy() for variable in state])

    def on_train_batch_end(self, batch, logs=None):
        if self.one_step:
            self.save()
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if not self.one_step:
            self.save()


def build_without_dropout(*args, **kwargs):
    model = networks.create(*args, **kwargs)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("state")
    parser.add_argument("--one-step", action="store_true")
    parser.add_argument("--logical-cpus", type=int, default=0)
    split = sys.argv.index("--")
    options = parser.parse_args(sys.argv[1:split])
    if options.logical_cpus:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * options.logical_cpus)
    swaps = {"build_model": build_without_dropout, "policy": "float64"} if options.one_step else {}
    return train.main(sys.argv[split + 1:],
                      extra_callbacks=[SaveState(options.state, options.one_step)], **swaps)


if __name__ == "__main__":
    sys.exit(main())
