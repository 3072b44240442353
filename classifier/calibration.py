"""Probabilities that mean what they say: temperature scaling, and how to measure calibration.

A network trained with cross-entropy is over-confident: of the images it labels with 97%,
fewer than 97 in 100 are right. Temperature scaling (Guo et al., 2017) divides the logits by
one number T, fitted after training on the validation part (never the test part) by
minimising the negative log-likelihood there; T > 1 softens the probabilities. It changes no
prediction (the order of the logits stays), only the confidence. The division is a layer of
the model (temperature, between logits and probabilities), so predict.py, the test report,
test-time augmentation and every exported model give the calibrated numbers.

Multi-label models get one temperature for all their labels. One per label was measured
against it on two multi-label runs of the demo dataset (docs/trust.md): it won on one, lost
on the other, and there drove a label that the validation part separated perfectly to the
lowest temperature allowed, every probability of that label pushed to 0 or 1.

Confidence here is what "I don't know" is decided on: for one label per image, the top
probability; for several labels, the least sure of the yes/no decisions, max(p, 1 - p)
over the labels.
"""

import logging

import keras
import numpy as np
import tensorflow as tf
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from classifier import networks

log = logging.getLogger("calibration")

TEMPERATURE_LAYER = "temperature"
BINS = 15  # the usual number of bins of the expected calibration error
# Temperatures outside this range mean a broken model rather than an over-confident one.
LOWEST, HIGHEST = 0.05, 20.0
# The accuracy on the answered images that the suggested --min-confidence reaches.
TARGET_ACCURACY = 0.95


def logits_model(model):
    """The model up to its logits, before any temperature and activation."""
    return keras.Model(model.input, model.get_layer(networks.OUTPUT_LAYER).output)


def with_temperature(model, temperature, multi_label):
    """model with its logits divided by temperature before the activation; None gives the
    model without a temperature layer. The layers are model's own, not copies."""
    x = model.get_layer(networks.OUTPUT_LAYER).output
    if temperature is not None:
        # float32: the division must not lose digits to a bfloat16 policy.
        x = keras.layers.Rescaling(1.0 / temperature, dtype="float32",
                                   name=TEMPERATURE_LAYER)(x)
    outputs = keras.layers.Activation("sigmoid" if multi_label else "softmax", dtype="float32",
                                      name=networks.ACTIVATION)(x)
    return keras.Model(model.input, outputs, name=model.name)


def view_logits(up_to_logits, batches, tta=False):
    """The logits (logits_model) of the images of batches (images, targets): one view, or
    with tta two, the second of the mirror images; (views, images, classes)."""
    views = [up_to_logits.predict(batches, verbose=0)]
    if tta:
        views.append(up_to_logits.predict(
            batches.map(lambda images, _: tf.reverse(images, axis=[2])), verbose=0))
    return np.stack(views).astype(np.float32)


def view_probabilities(views, multi_label, temperature=1.0):
    """The probabilities the model with temperature gives for view_logits's views: with
    test-time augmentation, those of each image and its mirror image averaged, as
    inference.probabilities does."""
    return np.mean([probabilities(logits, multi_label, temperature) for logits in views],
                   axis=0)


def temperature_of(model):
    """The temperature a model divides its logits by (1.0 without a temperature layer)."""
    try:
        return 1.0 / float(model.get_layer(TEMPERATURE_LAYER).scale)
    except ValueError:
        return 1.0


def probabilities(logits, multi_label, temperature=1.0):
    scaled = np.asarray(logits, np.float64) / temperature
    if multi_label:
        return 1.0 / (1.0 + np.exp(-scaled))
    scaled -= scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(scaled)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits, targets, multi_label, temperature):
    # From the logits, not the probabilities: exact also where a probability rounds to 1.
    scaled = np.asarray(logits, np.float64) / temperature
    if multi_label:
        return np.mean(np.logaddexp(0, scaled) - targets * scaled)
    return np.mean(logsumexp(scaled, axis=1) - (scaled * targets).sum(axis=1))


def fit_temperature(logits, targets, multi_label):
    """The temperature that minimises the negative log-likelihood of targets (one column per
    class, 0/1) given logits; searched on a log scale, where the likelihood is unimodal."""
    targets = np.asarray(targets, np.float64)
    if np.all(correct(probabilities(logits, multi_label), targets if multi_label
                      else targets.argmax(axis=1), multi_label)):
        # Every validation image answered right is fitted best by ever sharper
        # probabilities: the search would stop at its bound, not at a calibrated temperature.
        log.warning("the model answers all %d validation images right: nothing to calibrate "
                    "on, the probabilities stay as trained (a larger validation part, "
                    "--val-size or --val-dir, would give it something)", len(targets))
        return 1.0
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, targets, multi_label, np.exp(log_t)),
        bounds=(np.log(LOWEST), np.log(HIGHEST)), method="bounded")
    temperature = float(np.exp(found.x))
    log.info("calibrated on %d validation images: temperature %.3f", len(targets), temperature)
    return temperature


def confidence(probabilities, multi_label):
    """How sure the model is of its whole answer for each image (see above)."""
    if multi_label:
        return np.maximum(probabilities, 1 - probabilities).min(axis=1)
    return probabilities.max(axis=1)


def correct(probabilities, true, multi_label, threshold=0.5):
    """Whether each image's answer is right: its top class, or every label's yes/no."""
    if multi_label:
        return np.all((probabilities >= threshold) == np.asarray(true, bool), axis=1)
    return probabilities.argmax(axis=1) == true


def reliability(probabilities, true, multi_label, bins=BINS):
    """Per confidence bin of equal width: (mean confidence, accuracy, images); and the
    expected calibration error, the images' share-weighted gap between the two. For a
    multi-label model every yes/no decision of a label counts as one answer."""
    if multi_label:
        decisions = np.asarray(probabilities).ravel()
        sure = np.maximum(decisions, 1 - decisions)
        right = (decisions >= 0.5) == np.asarray(true, bool).ravel()
    else:
        sure = confidence(probabilities, False)
        right = correct(probabilities, true, False)
    # The lowest possible confidence (0.5, or 1/classes) falls into the first bin, 1.0 the last.
    which = np.minimum((sure * bins).astype(int), bins - 1)
    rows, error = [], 0.0
    for index in range(bins):
        inside = which == index
        if inside.any():
            gap = abs(sure[inside].mean() - right[inside].mean())
            error += inside.mean() * gap
            rows.append((float(sure[inside].mean()), float(right[inside].mean()),
                         int(inside.sum())))
        else:
            rows.append((None, None, 0))
    return rows, float(error)


def coverage_curve(probabilities, true, multi_label, threshold=0.5):
    """For each --min-confidence worth trying (each image's own confidence), the share of
    images answered and the accuracy on them: (thresholds, coverage, accuracy), the
    thresholds rising."""
    sure = confidence(probabilities, multi_label)
    right = correct(probabilities, true, multi_label, threshold)
    order = np.argsort(-sure, kind="stable")
    sure, right = sure[order], right[order]
    answered = np.arange(1, len(sure) + 1)
    accuracy = np.cumsum(right) / answered
    # Ties: an image is answered with every other image of the same confidence.
    last_of_tie = np.r_[sure[1:] != sure[:-1], True]
    return (sure[last_of_tie][::-1], (answered / len(sure))[last_of_tie][::-1],
            accuracy[last_of_tie][::-1])


def suggest_min_confidence(probabilities, true, multi_label, threshold=0.5,
                           target=TARGET_ACCURACY):
    """The lowest --min-confidence, in steps of 0.01, whose answered images are at least
    target accurate: (it, the share answered, their accuracy), or None when none is."""
    sure = confidence(probabilities, multi_label)
    right = correct(probabilities, true, multi_label, threshold)
    for candidate in np.round(np.arange(0, 1.0001, 0.01), 2):
        answered = sure >= candidate
        if answered.any() and right[answered].mean() >= target:
            return float(candidate), float(answered.mean()), float(right[answered].mean())
    return None
