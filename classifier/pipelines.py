"""The input pipelines: batches for fit, evaluate and predict, with the augmentation
(augmentation.py) applied, and each replica's part of a batch when several train.

Only positions travel through tf.data; each batch is gathered from the uint8 images (in
memory, or image_cache.ImageRows still on disk) in parallel map calls, so the next batches
are ready while one trains, and only the batches in flight are held as float32.
"""

import functools
import math

import numpy as np
import tensorflow as tf
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from classifier.augmentation import random_transform


def steps_per_epoch(count, batch_size):
    """Steps that show each of count training images once: the last batch may be short."""
    return math.ceil(count / batch_size)


def shard_part(count, shard):
    """The part of a global batch of count images that shard (index, shards) trains on:
    contiguous, sizes differing by at most one image."""
    index, shards = shard
    return slice(index * count // shards, (index + 1) * count // shards)


def _sharded(chosen, shard):
    """Shard's positions among those chosen for a batch, with a weight for each (1). A part
    that would be empty (a short last batch, split between more shards than it has images)
    gets the batch's first image with weight 0 instead: oneDNN, TensorFlow's CPU kernels,
    cannot compute on an empty batch."""
    part = chosen[shard_part(len(chosen), shard)]
    if len(part):
        return part, np.ones(len(part), np.float32)
    return chosen[:1], np.zeros(1, np.float32)


def batches(x, y, batch_size, shard=(0, 1)):
    """Evaluation batches of uint8 images x as float32, in order, without augmentation, as
    (images, targets). With shard (index, shards) of several, only that shard's part of each
    batch, as (images, targets, weights) (_sharded)."""
    def make_batch(start):
        chosen, weights = _sharded(np.arange(start, min(start + batch_size, len(x))), shard)
        return x[chosen].astype(np.float32), y[chosen], weights

    return _pipeline(tf.data.Dataset.range(0, len(x), batch_size), make_batch, x, y,
                     weighted=shard[1] > 1)


def training_batches(x, y, batch_size, augmentation, seed, first_epoch=0, shard=(0, 1),
                     mix=None):
    """Augmented batches, epoch after epoch from first_epoch, without end: fit them with
    steps_per_epoch = ceil(len(x) / batch_size), so that every epoch sees every image once.
    With shard (index, shards) of several, only that shard's part of each batch, and the
    weights of its images, as batches() gives them.

    Each batch is gathered from a fresh permutation of all the images (a full shuffle, 8
    bytes per image). augmentation is an ImageDataGenerator, whose transforms run in the
    parallel map calls, a Keras layer applied to whole batches inside tf.data, or None. The
    order, and the ImageDataGenerator transforms, of epoch e depend only on (seed, e): a run
    resumed at epoch e sees the batches the uninterrupted run would have seen, not a replay
    of the first epochs, and a shard's images get the transforms they get in the whole batch.
    Keras's PyDataset would copy each batch through a Python generator: slower. mix, a
    Keras MixUp or CutMix layer (augmentation.mixing), blends the augmented batches.
    """
    steps = steps_per_epoch(len(x), batch_size)
    generator = augmentation if isinstance(augmentation, ImageDataGenerator) else None

    @functools.lru_cache(maxsize=4)
    def order(epoch):
        return np.random.default_rng([seed, epoch]).permutation(len(x))

    def make_batch(position):
        epoch, step = divmod(int(position), steps)
        batch = order(epoch)[step * batch_size:(step + 1) * batch_size]
        chosen, weights = _sharded(batch, shard)
        images = x[chosen].astype(np.float32)
        if generator:
            # One seed per image of the whole batch, drawn in order, whichever part is ours.
            rng = np.random.default_rng([seed, epoch, step])
            seeds = dict(zip(batch, (int(rng.integers(2**31)) for _ in batch)))
            images = np.stack([random_transform(generator, image, seeds[index])
                               for image, index in zip(images, chosen)])
        return images, y[chosen], weights

    dataset = _pipeline(tf.data.Dataset.counter(start=first_epoch * steps), make_batch, x, y,
                        weighted=shard[1] > 1)
    if generator and mix is None:
        return dataset
    if not generator and augmentation is not None:
        dataset = dataset.map(lambda images, *rest: (augmentation(images, training=True), *rest),
                              num_parallel_calls=tf.data.AUTOTUNE)
    if mix is not None:
        dataset = dataset.map(lambda images, targets, *rest: (*_mixed(mix, images, targets),
                                                              *rest),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _mixed(mix, images, targets):
    mixed = mix({"images": images, "labels": targets}, training=True)
    return mixed["images"], mixed["labels"]


def _pipeline(positions, make_batch, x, y, weighted):
    """make_batch(position) gives (images, targets, weights); the weights travel on only
    when weighted."""
    def tf_make_batch(position):
        images, targets, weights = tf.numpy_function(make_batch, [position],
                                                     [tf.float32, tf.float32, tf.float32])
        images.set_shape((None, *x.shape[1:]))
        targets.set_shape((None, *y.shape[1:]))
        weights.set_shape((None,))
        return (images, targets, weights) if weighted else (images, targets)

    return positions.map(tf_make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)
