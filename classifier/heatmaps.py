"""Where the network looked: Grad-CAM heat maps of a trained model, one per image and class.

    explainer = Explainer(model)
    maps = explainer.heat_maps(images, class_indices)   # N x h x w, 0..1

Keras 3 has no Grad-CAM of its own, so this is the method of keras-io's example "Grad-CAM
class activation visualization" (after Selvaraju et al., "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", 2017): the gradient of a class's score with
respect to the output of the last convolutional layer, averaged over the image to one weight
per channel, weights that sum the channels into a map, of which only the positive part is
kept. The score is the output of the layer called "logits" (networks.OUTPUT_LAYER), before any
softmax or temperature: a softmax's gradient vanishes as its probability nears 1, and whatever
a model puts between its logits and its output must not change where it looked.

Every network of networks.REGISTRY is one flat functional graph, so the layer a map is taken
from is found by its place in that graph (last_convolution), whatever the network.
"""

import cv2
import keras
import numpy as np
import tensorflow as tf

from classifier import networks

# Layers with an image-shaped output that are not where Grad-CAM should look: pooling
# coarsens the last convolution's grid, dropout is the identity at inference, and the input
# (or its scaling) is the image itself, not what the network made of it.
_NOT_A_CONVOLUTION = (keras.layers.InputLayer, keras.layers.MaxPooling2D,
                      keras.layers.AveragePooling2D, keras.layers.GlobalMaxPooling2D,
                      keras.layers.GlobalAveragePooling2D, keras.layers.Dropout,
                      keras.layers.SpatialDropout2D, keras.layers.GaussianDropout,
                      keras.layers.AlphaDropout, keras.layers.Rescaling)


def last_convolution(model):
    """The name of the layer whose output Grad-CAM weighs: the last layer, in the model's
    order, with a (batch, height, width, channels) output that is neither pooling nor dropout,
    so that the map keeps the resolution of the last convolution."""
    for layer in reversed(model.layers):
        if isinstance(layer, _NOT_A_CONVOLUTION):
            continue
        if len(_output_shape(layer)) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no layer with an image-shaped (batch, height, "
                     "width, channels) output to take a Grad-CAM heat map from")


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except AttributeError:  # a layer never called, or one with several outputs
        return ()


class Explainer:
    """Grad-CAM heat maps of model, from the output of layer_name (None: last_convolution),
    its gradient model built once, for one batch after another. traced: as one TensorFlow
    graph, traced at the first batch (seconds for a big network: 4 s for efficientnet_v2_b0
    on two CPU cores), then fast (0.05 s for three images, against 0.6 s eagerly); a single
    batch is sooner done without (grad_cam)."""

    def __init__(self, model, layer_name=None, traced=True):
        self.layer_name = layer_name or last_convolution(model)
        self._features_and_logits = keras.Model(
            model.input, [model.get_layer(self.layer_name).output,
                          model.get_layer(networks.OUTPUT_LAYER).output])
        self._maps = self._unnormalized_maps
        if traced:
            # One trace for every batch size: predict.py's last batch is usually smaller.
            image_shape = tuple(model.input.shape)[1:]
            self._maps = tf.function(self._maps, input_signature=[
                tf.TensorSpec((None, *image_shape), tf.float32),
                tf.TensorSpec((None,), tf.int32)])

    def _unnormalized_maps(self, images, class_indices):
        with tf.GradientTape() as tape:
            features, logits = self._features_and_logits(images, training=False)
            # Each image's score depends on its own pixels only (BatchNormalization uses its
            # moving statistics in inference), so the gradient of the batch's sum is every
            # image's own gradient at once.
            scores = tf.gather(tf.cast(logits, tf.float32), class_indices, axis=1,
                               batch_dims=1)
            total = tf.reduce_sum(scores)
        # A mixed-precision model computes in bfloat16 or float16: the maps in float32.
        gradients = tf.cast(tape.gradient(total, features), tf.float32)
        features = tf.cast(features, tf.float32)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(features * channel_weights, axis=-1))

    def heat_maps(self, images, class_indices):
        """One map per image of images (N x height x width x 3, raw RGB pixels 0..255, as
        the model takes them), for the class of class_indices at the same place: float32,
        N x h x w at the layer's resolution, each scaled by its own maximum to 0..1 (a map
        without evidence stays all zero)."""
        maps = self._maps(tf.convert_to_tensor(np.asarray(images, np.float32)),
                          tf.convert_to_tensor(np.asarray(class_indices, np.int32))).numpy()
        peaks = maps.max(axis=(1, 2), keepdims=True)
        return np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)


def grad_cam(model, images, class_indices, layer_name=None):
    """The heat maps of a single batch (Explainer.heat_maps), computed eagerly; a caller with
    many batches keeps one traced Explainer."""
    return Explainer(model, layer_name, traced=False).heat_maps(images, class_indices)


def resize_to(heat_map, height, width):
    """heat_map (h x w, 0..1) at an image's size (height x width), bilinear, as keras-io's
    example resizes it: smooth, its maximum still at the centre of the strongest cell."""
    resized = cv2.resize(np.asarray(heat_map, np.float32), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def grayscale_png_pixels(heat_map):
    """heat_map (0..1) as 8-bit gray pixels, brighter where there is more evidence."""
    return np.round(np.clip(heat_map, 0.0, 1.0) * 255).astype(np.uint8)


def overlay(image_rgb, heat_map, alpha=0.4):
    """image_rgb (uint8, height x width x 3) with heat_map in the jet colours over it, as
    keras-io's example shows it: alpha of the colour to 1 - alpha of the image (the example
    adds alpha of the colour to all of the image and rescales; a blend needs no rescaling).
    The map is resized to the image first, so that the colours are smooth, not the layer's
    blocks."""
    height, width = image_rgb.shape[:2]
    gray = grayscale_png_pixels(resize_to(heat_map, height, width))
    jet = cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = (1 - alpha) * image_rgb.astype(np.float32) + alpha * jet.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
