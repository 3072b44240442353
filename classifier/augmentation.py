"""The augmentation of training images: ImageDataGenerator's transforms (the blog's), the same
transforms as Keras layers, Keras's RandAugment, MixUp and CutMix, and the values each recipe
gives them. The test and validation images are never augmented."""

import math
import threading

import keras

# --recipe fast's augmentation. It matters most: in 25 epochs the blog's heavy one (rotation
# 45, shear 0.2, zoom 0.2, shifts 0.1) keeps the network from fitting (training accuracy
# 0.66, validation 0.64; with this one 0.87 and 0.80).
RECIPES = {"fast": {"rotation_range": 0.0, "shear_range": 0.0, "zoom_range": 0.1,
                    "width_shift_range": 0.05, "height_shift_range": 0.05}}
BLOG = {"rotation_range": 45, "width_shift_range": 0.1, "height_shift_range": 0.1,
        "shear_range": 0.2, "zoom_range": 0.2}
# The strengths --tune chooses from, each with the blog's mirroring.
STRENGTHS = {"none": dict.fromkeys(BLOG, 0.0), "light": RECIPES["fast"], "blog": BLOG}

_transform_lock = threading.Lock()


def layers(kind, seed, rotation_range, width_shift_range, height_shift_range, shear_range,
           zoom_range, horizontal_flip):
    """ImageDataGenerator's transforms with the same parameters, as Keras layers (kind
    "layers"), or Keras's RandAugment (kind "randaugment"); then the flip. None when every
    transform is switched off."""
    def options(offset):
        # float32 even under mixed precision: these run in tf.data, before the model casts.
        return {"fill_mode": "nearest", "seed": seed + offset, "dtype": "float32"}

    chosen = []
    if kind == "randaugment":
        chosen.append(keras.layers.RandAugment(value_range=(0, 255), seed=seed, dtype="float32"))
    else:
        if rotation_range:
            # RandomRotation's factor is a fraction of a full turn.
            chosen.append(keras.layers.RandomRotation(rotation_range / 360, **options(1)))
        if width_shift_range or height_shift_range:
            chosen.append(keras.layers.RandomTranslation(height_shift_range, width_shift_range,
                                                         **options(2)))
        if shear_range:
            # ImageDataGenerator's shear_range is an angle in degrees; RandomShear wants the
            # horizontal displacement per unit of height, tan(angle), sampled in [-f, f].
            chosen.append(keras.layers.RandomShear(x_factor=math.tan(math.radians(shear_range)),
                                                   **options(3)))
        if zoom_range:
            # Like ImageDataGenerator, each axis is zoomed in or out by up to zoom_range alone.
            zoom = (-zoom_range, zoom_range)
            chosen.append(keras.layers.RandomZoom(zoom, zoom, **options(4)))
    if horizontal_flip:
        chosen.append(keras.layers.RandomFlip("horizontal", seed=seed + 5, dtype="float32"))
    return keras.Sequential(chosen, name="augmentation") if chosen else None


def random_transform(generator, image, seed):
    """ImageDataGenerator.random_transform, reproducible from seed even in parallel threads."""
    with _transform_lock:  # get_random_transform seeds NumPy's global generator
        params = generator.get_random_transform(image.shape, seed=seed)
    return generator.apply_transform(image, params)


def mixing(kind, seed):
    """--mix: Keras's MixUp or CutMix layer, or None."""
    chosen = {"mixup": keras.layers.MixUp, "cutmix": keras.layers.CutMix}
    return chosen[kind](seed=seed, dtype="float32") if kind in chosen else None
