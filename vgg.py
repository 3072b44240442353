"""The blog's small VGG-style network, as a pure builder: shape and class count in, model out.

Blocks of 3x3 'same' convolutions (stride 1) with ReLU and BatchNormalization, then 2x2 max
pooling (stride 2) and Dropout 0.25; the filters double per block: 32; 64x2; 128x3; 128x3.
Then Dense 512 + BatchNormalization + Dropout 0.5 and the output layer: softmax (one class
per image), or with multi_label one sigmoid per label, each label judged on its own. About
1.9 M parameters at 64x64x3 with 8 classes.

BatchNormalization momentum defaults to 0.9 (PyTorch's value), not Keras's 0.99: with 0.99
the moving statistics lag so far behind the weights in short runs that test accuracy stays
near chance while training accuracy climbs. Pass bn_momentum=0.99 for the blog's behaviour.

When several replicas train (tf.distribute), each sees only its part of a batch: with
synchronized_bn=True BatchNormalization takes its batch statistics over the whole batch, across
replicas, so every replica keeps the same moving statistics and the statistics are those of
one replica training on the whole batch. It changes nothing for a single replica.
"""

import keras
from keras import layers

BLOCKS = ((32, 1), (64, 2), (128, 3), (128, 3))


def build_vgg(input_shape, num_classes, bn_momentum=0.9, multi_label=False,
              synchronized_bn=False):
    """Return an uncompiled keras.Model taking RGB images of input_shape with values in 0..255
    and giving one probability per class."""
    def batch_norm():
        return layers.BatchNormalization(momentum=bn_momentum, synchronized=synchronized_bn)

    inputs = keras.Input(shape=input_shape, name="image")
    # Scaling lives in the model so that every caller, exported models included, feeds raw pixels.
    x = layers.Rescaling(1.0 / 255, name="scale_to_unit")(inputs)
    for block, (filters, convolutions) in enumerate(BLOCKS, start=1):
        for _ in range(convolutions):
            x = layers.Conv2D(filters, 3, strides=1, padding="same", activation="relu")(x)
            x = batch_norm()(x)
        x = layers.MaxPooling2D(pool_size=2, strides=2, name=f"block{block}_pool")(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = batch_norm()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(num_classes, name="logits")(x)
    # float32 output keeps the probabilities exact when the rest runs in mixed precision.
    outputs = layers.Activation("sigmoid" if multi_label else "softmax", dtype="float32",
                                name="probabilities")(x)
    return keras.Model(inputs, outputs, name="vgg")
