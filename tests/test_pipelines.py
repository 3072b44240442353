"""The input pipelines: every epoch a full shuffle, augmentation that keeps labels, resumed
runs that see their own epoch's batches, streaming equal to memory, and shards."""

import math

import numpy as np
import pytest
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from classifier import augmentation, dataset, image_cache, pipelines
from conftest import numbered_images, write_image


def test_evaluation_batches_keep_the_order():
    x, y = numbered_images(10)
    seen = np.concatenate([t.numpy().argmax(axis=1) for _, t in pipelines.batches(x, y, 4)])
    assert seen.tolist() == list(range(10))


def epochs_of(batches, steps, count):
    iterator = iter(batches)
    return [[int(label) for _ in range(steps)
             for label in next(iterator)[1].numpy().argmax(axis=1)] for _ in range(count)]


def test_every_epoch_sees_the_whole_training_split_in_a_new_order():
    x, y = numbered_images(12)
    flip_only = ImageDataGenerator(horizontal_flip=True)
    epochs = epochs_of(pipelines.training_batches(x, y, 5, flip_only, seed=0), steps=3, count=3)
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]


def test_augmented_batches_keep_images_and_labels_together():
    x, y = numbered_images(12)
    flip_only = ImageDataGenerator(horizontal_flip=True)
    for images, targets in pipelines.training_batches(x, y, 5, flip_only, seed=0).take(6):
        assert np.allclose(images.numpy()[:, 0, 0, 0], targets.numpy().argmax(axis=1) * 20)


def test_a_resumed_run_sees_the_batches_of_its_epoch_not_a_replay():
    x, y = numbered_images(12)
    shift = ImageDataGenerator(width_shift_range=0.3)
    whole = iter(pipelines.training_batches(x, y, 5, shift, seed=7))
    uninterrupted = [next(whole) for _ in range(9)][6:]  # epoch 2 (0-based)
    resumed = list(pipelines.training_batches(x, y, 5, shift, seed=7, first_epoch=2).take(3))
    for (a_images, a_targets), (b_images, b_targets) in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(a_targets.numpy(), b_targets.numpy())
        np.testing.assert_array_equal(a_images.numpy(), b_images.numpy())


@pytest.mark.parametrize("shards", [2, 3])
def test_the_parts_of_each_batch_make_the_whole_batch(shards):
    x, y = numbered_images(13)
    shift = ImageDataGenerator(width_shift_range=0.3, horizontal_flip=True)
    whole = list(pipelines.training_batches(x, y, 4, shift, seed=5).take(8))
    parts = [list(pipelines.training_batches(x, y, 4, shift, seed=5,
                                             shard=(index, shards)).take(8))
             for index in range(shards)]
    for step, (images_, targets) in enumerate(whole):
        counted = [(part[step][2].numpy() == 1) for part in parts]
        # The last batch of each epoch has one image: the other parts get a stand-in.
        assert all(len(part[step][0]) for part in parts)
        np.testing.assert_array_equal(np.concatenate(
            [part[step][0].numpy()[kept] for part, kept in zip(parts, counted)]), images_.numpy())
        np.testing.assert_array_equal(np.concatenate(
            [part[step][1].numpy()[kept] for part, kept in zip(parts, counted)]),
            targets.numpy())
    evaluation = [list(pipelines.batches(x, y, 4, shard=(index, shards)))
                  for index in range(shards)]
    for step, (_, targets) in enumerate(pipelines.batches(x, y, 4)):
        np.testing.assert_array_equal(np.concatenate(
            [part[step][1].numpy()[part[step][2].numpy() == 1] for part in evaluation]),
            targets.numpy())
    assert sum(float(part[-1][2].numpy().sum()) for part in evaluation) == 1


def test_shards_differ_by_at_most_one_image():
    sizes = [len(range(13)[pipelines.shard_part(13, (index, 4))]) for index in range(4)]
    assert sizes == [3, 3, 3, 4]
    assert [len(range(1)[pipelines.shard_part(1, (index, 2))]) for index in range(2)] == [0, 1]


def split_both_ways(tmp_path):
    folder = tmp_path / "data"
    paths = [write_image(folder / f"{index:02d}.png", np.full((12, 12, 3), index * 9))
             for index in range(20)]
    labels = np.array(["a", "b"] * 10)
    targets = np.eye(2, dtype=np.float32)[(labels == "b").astype(int)]
    rows, _, _, _ = image_cache.load_images(paths, 8, str(tmp_path / "cache"), progress=False)
    loaded = {"train": dataset.Folder(rows, labels, paths, [(12, 12)] * 20)}
    in_memory = dataset.split(loaded, None, targets, 0.15, 3, in_memory=True)
    streamed = dataset.split(loaded, None, targets, 0.15, 3, in_memory=False)
    return (in_memory.train, in_memory.test), (streamed.train, streamed.test)


def test_streaming_and_in_memory_give_the_same_batches(tmp_path):
    (memory_train, memory_test), (stream_train, stream_test) = split_both_ways(tmp_path)
    assert isinstance(memory_train.x, np.ndarray)
    assert isinstance(stream_train.x, image_cache.ImageRows)
    generator = ImageDataGenerator(rotation_range=30, horizontal_flip=True)
    memory_batches = pipelines.training_batches(memory_train.x, memory_train.y, 4, generator,
                                                seed=1)
    stream_batches = pipelines.training_batches(stream_train.x, stream_train.y, 4, generator,
                                                seed=1)
    sizes = []
    for (memory_x, memory_y), (stream_x, stream_y) in zip(memory_batches.take(6),
                                                          stream_batches.take(6)):
        sizes.append(len(memory_x))
        assert memory_x.shape == stream_x.shape and memory_x.shape[1:] == (8, 8, 3)
        np.testing.assert_array_equal(memory_y, stream_y)
        np.testing.assert_array_equal(memory_x, stream_x)
    assert sizes == [4, 4, 4, 4, 1, 4]  # 17 training images: the epoch's last batch has one
    memory_batches = list(pipelines.batches(memory_test.x, memory_test.y, 2).as_numpy_iterator())
    stream_batches = list(pipelines.batches(stream_test.x, stream_test.y, 2).as_numpy_iterator())
    assert len(memory_batches) == len(stream_batches) == 2  # 3 test images: 2, then 1
    for (memory_x, memory_y), (stream_x, stream_y) in zip(memory_batches, stream_batches):
        np.testing.assert_array_equal(memory_x, stream_x)
        np.testing.assert_array_equal(memory_y, stream_y)


def test_layer_augmentation_uses_the_generator_parameters():
    augment = augmentation.layers("layers", 0, rotation_range=45, width_shift_range=0.1,
                                  height_shift_range=0.1, shear_range=10, zoom_range=0.2,
                                  horizontal_flip=True)
    found = {type(layer).__name__: layer for layer in augment.layers}
    assert found["RandomRotation"].factor == pytest.approx((-45 / 360, 45 / 360))
    assert found["RandomShear"].x_factor == pytest.approx(
        (-math.tan(math.radians(10)), math.tan(math.radians(10))))
    assert found["RandomZoom"].height_factor == found["RandomZoom"].width_factor == (-0.2, 0.2)
    assert found["RandomFlip"].mode == "horizontal"
    assert augmentation.layers("layers", 0, 0, 0, 0, 0, 0, horizontal_flip=False) is None


def test_layer_augmentation_changes_each_image_differently():
    pattern = np.tile((np.arange(16 * 16 * 3).reshape(1, 16, 16, 3) % 251).astype(np.uint8),
                      (4, 1, 1, 1))
    batch_x, _ = next(iter(pipelines.training_batches(
        pattern, np.eye(4, dtype=np.float32), 4, augmentation.layers("layers", 0, 45, 0.1, 0.1, 0.2, 0.2, True),
        seed=0)))
    batch_x = batch_x.numpy()
    assert batch_x.dtype == np.float32
    assert not np.array_equal(batch_x[0], batch_x[1])
    assert not np.array_equal(batch_x[0], pattern[0].astype(np.float32))


def test_val_size_holds_out_validation_and_leaves_the_test_split_as_it_was():
    labels = np.array(["a", "b"] * 50)
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    targets = np.eye(2, dtype=np.float32)[(labels == "b").astype(int)]
    loaded = {"train": dataset.Folder(images, labels, [f"{i}.png" for i in range(100)],
                                      [(1, 1)] * 100)}
    blog = dataset.split(loaded, None, targets, 0.15, 3, in_memory=True)
    held = dataset.split(loaded, None, targets, 0.15, 3, in_memory=True, val_size=0.2)
    assert not blog.has_validation and blog.validation is blog.test
    assert held.has_validation
    np.testing.assert_array_equal(held.test.x, blog.test.x)
    assert (len(held.train.x), len(held.validation.x), len(held.test.x)) == (65, 20, 15)
    seen = np.concatenate([held.train.x, held.validation.x, held.test.x]).ravel()
    assert sorted(seen) == list(range(100))  # each image in one part
    assert held.validation.y.sum(axis=0).tolist() == [10, 10]  # stratified
