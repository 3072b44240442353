"""Every network train.py can build, behind one contract, and where their weights come from.

    create(name, input_shape, num_classes, multi_label=False, weights=None, ...)

gives an uncompiled keras.Model that takes raw RGB pixels 0..255 (each network's own
preprocessing is inside it, as vgg.py's rescaling is) and gives one float32 probability per
class: softmax, or with multi_label one sigmoid per label. predict.py, export.py, the cache and
the test report rely on exactly that, whatever the network.

Besides the blog's small VGG (vgg.py, the default), the networks of keras.applications that a
CPU can train: each is its convolutional base (include_top=False) built on the model's own
input, so that the whole network is one flat graph of layers, then the head of Keras's
transfer-learning guide: global average pooling, dropout 0.2 and the output layer. Every
network's output layer is called "logits" and its activation "probabilities": --init-from
replaces that layer when the classes change, and fine-tuning trains it alone first.

ImageNet weights come through Keras's own download and cache (KERAS_HOME, ~/.keras/models),
under the file names Keras gives them; resolve_weights turns --weights into a file before any
image is loaded.
"""

import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass

import keras
from keras import layers

import vgg
from classifier.cli import UserError

log = logging.getLogger("networks")

DEFAULT = "vgg"
# Every network ends in these two layers (vgg.py names them the same).
OUTPUT_LAYER, ACTIVATION = "logits", "probabilities"
KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"
# A machine without a network must hear so at once, not after a long connection time-out.
REACHABLE_WITHIN_SECONDS = 5


@dataclass(frozen=True)
class ImagenetFile:
    """A keras.applications weights file without the top layers, as Keras names, places and
    checks it."""
    name: str
    folder: str
    md5: str

    @property
    def url(self):
        return KERAS_APPLICATIONS + self.folder + "/" + self.name


@dataclass(frozen=True)
class Network:
    """What the project knows of a network: how to build it, the smallest image size it can
    take, the size it was designed for, and its ImageNet weights file (None: it has none)."""
    name: str
    build: object
    min_size: int
    recommended_size: int
    imagenet: ImagenetFile = None
    why_min_size: str = ""

    @property
    def default_weights(self):
        return "imagenet" if self.imagenet else "none"


def _build_vgg(input_shape, num_classes, multi_label=False, weights=None, bn_momentum=0.9,
               synchronized_bn=False):
    if weights is not None:
        raise UserError("the vgg network has no pretrained weights of its own: start from a "
                        "model you trained with --init-from, or pick --model vgg16")
    return vgg.build_vgg(input_shape, num_classes, bn_momentum=bn_momentum,
                         multi_label=multi_label, synchronized_bn=synchronized_bn)


def _vgg16_input(inputs):
    # keras.applications.vgg16.preprocess_input's "caffe" mode, less its swap to BGR: the
    # first convolution's kernel is turned to RGB instead (_rgb_first_convolution). Both here
    # are plain per-channel Rescaling layers without weights: Normalization's constants
    # reach ONNX as inputs nobody feeds.
    return layers.Rescaling(1.0, offset=[-123.68, -116.779, -103.939],
                            name="subtract_imagenet_mean")(inputs)


def _efficientnet_input(inputs):
    # EfficientNetV2's own preprocessing (include_preprocessing): x / 255, then ImageNet's
    # mean and standard deviation per channel, as one Rescaling.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return layers.Rescaling([1 / (255 * s) for s in std],
                            offset=[-m / s for m, s in zip(mean, std)],
                            name="imagenet_normalization")(inputs)


def _efficientnet_v2_b0(**options):
    return keras.applications.EfficientNetV2B0(include_preprocessing=False, **options)


def _rgb_first_convolution(model):
    first = model.get_layer("block1_conv1")
    first.kernel.assign(first.kernel.numpy()[:, :, ::-1, :])


def _application(name, constructor, preprocessing=None, after_loading=None):
    """A builder for a keras.applications base under the common head. preprocessing maps the
    raw pixels to what the base expects, where the base does not do it itself;
    after_loading adjusts loaded weights."""
    def build(input_shape, num_classes, multi_label=False, weights=None, bn_momentum=0.9,
              synchronized_bn=False):
        inputs = keras.Input(shape=input_shape, name="image")
        base = constructor(include_top=False, weights=weights, input_shape=input_shape,
                           input_tensor=preprocessing(inputs) if preprocessing else inputs)
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                # Keras's 0.99 lags too far behind in short runs from scratch (see vgg.py);
                # frozen, as when fine-tuning, the layer does not update its statistics.
                layer.momentum = bn_momentum
                layer.synchronized = synchronized_bn
        x = layers.GlobalAveragePooling2D(name="pool")(base.output)
        x = layers.Dropout(0.2, name="head_dropout")(x)
        x = layers.Dense(num_classes, name=OUTPUT_LAYER)(x)
        outputs = layers.Activation("sigmoid" if multi_label else "softmax", dtype="float32",
                                    name=ACTIVATION)(x)
        model = keras.Model(inputs, outputs, name=name)
        if weights is not None and after_loading:
            after_loading(model)
        return model
    return build


REGISTRY = {network.name: network for network in (
    Network("vgg", _build_vgg, 16, 64, why_min_size="the network halves it 4 times"),
    Network("vgg16", _application("vgg16", keras.applications.VGG16, _vgg16_input,
                                  _rgb_first_convolution),
            32, 224, ImagenetFile("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg16",
                                  "6d6bbae143d832006294945121d1f1fc"),
            why_min_size="the network halves it 5 times"),
    Network("mobilenet_v3_small", _application(
        "mobilenet_v3_small", keras.applications.MobileNetV3Small), 32, 224,
        ImagenetFile("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", "mobilenet_v3",
                     "d3e8ec802a04aa4fc771ee12a9a9b836"),
        why_min_size="keras.applications' smallest"),
    Network("efficientnet_v2_b0", _application(
        "efficientnet_v2_b0", _efficientnet_v2_b0, _efficientnet_input), 32, 224,
        ImagenetFile("efficientnetv2-b0_notop.h5", "efficientnet_v2",
                     "893217f2bb855e2983157299931e43ff"),
        why_min_size="keras.applications' smallest"),
)}


def get(name):
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown network {name}: choose one of {', '.join(REGISTRY)}") from None


def create(name, input_shape, num_classes, multi_label=False, weights=None, **options):
    """The network called name (REGISTRY), uncompiled; weights: None (random) or a weights
    file (resolve_weights); options: bn_momentum, synchronized_bn."""
    return get(name).build(input_shape, num_classes, multi_label=multi_label, weights=weights,
                           **options)


def check_image_size(name, image_size):
    network = get(name)
    if image_size < network.min_size:
        raise UserError(f"--image-size must be at least {network.min_size} for --model {name} "
                        f"({network.why_min_size}), got {image_size}; it was designed for "
                        f"{network.recommended_size}")


def check_strategy(name, strategy, pretrained):
    """Refuse what network name cannot train under strategy (distributed.kind): several
    devices of one machine train vgg only (the replicas of the keras.applications networks
    fail there on mismatched shapes inside TensorFlow's BatchNormalization), and several
    machines train without pretrained weights (fine-tuning's phases run on one)."""
    if strategy == "mirrored" and name != DEFAULT:
        raise UserError(f"{name} trains on one device per machine: drop --devices, or with "
                        "several GPUs pass --strategy single (auto mirrors over them)")
    if strategy == "multi-worker" and pretrained:
        raise UserError("fine-tuning pretrained weights runs on one machine: train several "
                        "workers with --weights none")


def cache_folder():
    """Where Keras keeps downloaded weights: KERAS_HOME, else ~/.keras, else (when that
    cannot be written) /tmp/.keras, as keras.utils.get_file chooses; then models/."""
    home = os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))
    if os.path.isdir(home) and not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return os.path.join(home, "models")


def resolve_weights(name, weights):
    """The weights file to build network name with, or None for random weights. weights is
    "none", "imagenet" or a path. "imagenet" takes the file from Keras's cache, downloading
    it there with keras.utils.get_file when it is missing and the network answers."""
    network = get(name)
    if weights == "none":
        return None
    if weights != "imagenet":
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: no such file")
        if name == "vgg":
            raise UserError("--weights PATH is for the keras.applications networks; to start "
                            "vgg from a model you trained, use --init-from MODEL.keras")
        return weights
    if not network.imagenet:
        raise UserError(f"--model {name} has no ImageNet weights: use --weights none (its "
                        "default), --init-from MODEL.keras, or another --model")
    wanted = network.imagenet
    # A file in the cache is taken as it is: Keras's own call would replace one whose hash
    # differs from the published file's by downloading it again.
    cached = os.path.join(cache_folder(), wanted.name)
    if os.path.isfile(cached):
        return cached
    if not _reachable(wanted.url):
        raise UserError(
            f"the ImageNet weights of {name} are not in {cache_folder()} and cannot be "
            f"downloaded (no network): put {wanted.name} (from {wanted.url}) into that "
            "folder, or train with --weights none")
    log.info("downloading the ImageNet weights of %s into %s", name, cache_folder())
    try:
        return keras.utils.get_file(wanted.name, wanted.url, cache_subdir="models",
                                    file_hash=wanted.md5)
    except Exception as error:  # get_file wraps every network failure in a plain Exception
        raise UserError(f"cannot download {wanted.url}: {error}") from None


def _reachable(url):
    """Whether url's host accepts a connection within REACHABLE_WITHIN_SECONDS. The name is
    looked up in a thread: a lookup without a network can hang far longer than any socket
    time-out."""
    parts = urllib.parse.urlsplit(url)
    answered = []

    def connect():
        try:
            with socket.create_connection((parts.hostname, parts.port or 443),
                                          timeout=REACHABLE_WITHIN_SECONDS):
                answered.append(True)
        except OSError:
            pass

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(REACHABLE_WITHIN_SECONDS)
    return bool(answered)


def with_dtype_policy(model, policy):
    """A copy of model, with its weights, whose layers compute in policy (a Keras dtype
    policy name); the output activation stays float32."""
    def in_policy(layer):
        config = layer.get_config()
        if "dtype" in config:  # not in the plain operations (x + 3) of keras.applications
            config["dtype"] = "float32" if layer.name == ACTIVATION else policy
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=in_policy)
    twin.set_weights(model.get_weights())
    return twin
