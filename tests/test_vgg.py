"""The network: the blog's VGG-style layout and size."""

import keras
import numpy as np

import vgg


def layers_of(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_output_is_a_probability_per_class():
    model = vgg.build_vgg((64, 64, 3), 8)
    assert model.input_shape == (None, 64, 64, 3)
    assert model.output_shape == (None, 8)
    probabilities = model.predict(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)),
                                  verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_parameter_count_matches_the_blog_network():
    # 9 convolutions, 10 batch norms, Dense 512 and Dense 8 at 64x64x3: about 1.9 M.
    assert vgg.build_vgg((64, 64, 3), 8).count_params() == 1_927_048


def test_blocks_double_the_filters_with_3x3_same_convolutions():
    model = vgg.build_vgg((64, 64, 3), 8)
    convolutions = layers_of(model, keras.layers.Conv2D)
    assert [c.filters for c in convolutions] == [32, 64, 64, 128, 128, 128, 128, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" and c.strides == (1, 1)
               for c in convolutions)
    pools = layers_of(model, keras.layers.MaxPooling2D)
    assert len(pools) == 4 and all(p.pool_size == (2, 2) and p.strides == (2, 2) for p in pools)
    rates = [d.rate for d in layers_of(model, keras.layers.Dropout)]
    assert rates == [0.25, 0.25, 0.25, 0.25, 0.5]
    assert [d.units for d in layers_of(model, keras.layers.Dense)] == [512, 8]


def test_batch_norm_momentum_defaults_to_0_9_and_can_be_the_blogs():
    default = layers_of(vgg.build_vgg((32, 32, 3), 3), keras.layers.BatchNormalization)
    assert len(default) == 10 and all(b.momentum == 0.9 for b in default)
    blog = layers_of(vgg.build_vgg((32, 32, 3), 3, bn_momentum=0.99),
                     keras.layers.BatchNormalization)
    assert all(b.momentum == 0.99 for b in blog)


def test_model_scales_raw_pixels_itself():
    model = vgg.build_vgg((32, 32, 3), 3)
    rescale = layers_of(model, keras.layers.Rescaling)
    assert len(rescale) == 1 and np.isclose(rescale[0].scale, 1 / 255)


def test_batch_norm_can_take_its_statistics_over_all_replicas():
    plain = layers_of(vgg.build_vgg((32, 32, 3), 3), keras.layers.BatchNormalization)
    synchronized = layers_of(vgg.build_vgg((32, 32, 3), 3, synchronized_bn=True),
                             keras.layers.BatchNormalization)
    assert not any(b.synchronized for b in plain) and all(b.synchronized for b in synchronized)
