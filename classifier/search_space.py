"""What --tune searches: the settings a trial may choose around the recipe's own (learning
rate, augmentation strength, label smoothing, image size, network), the first trial's
(the recipe's own), and the flag values a trial's settings stand for."""

import dataclasses
import logging

from classifier import augmentation, networks
from classifier.cli import UserError

log = logging.getLogger("tuning")

LR_FACTORS = (1 / 10, 3)  # the learning rates searched, around the recipe's --lr
LABEL_SMOOTHING = (0.0, 0.2)
SIZE_FACTORS = (0.5, 0.75, 1, 1.5)  # of --image-size
GIVEN = "as given"  # an augmentation the user's own flags set


@dataclasses.dataclass(frozen=True)
class Space:
    """What a trial may choose: a (low, high) range for lr and label_smoothing, a tuple of
    choices for the others; a setting the user gave stays fixed (a range of one value, or a
    single choice)."""
    lr: tuple
    label_smoothing: tuple
    augmentation: tuple
    image_size: tuple
    network: tuple

    def suggest(self, trial):
        """One trial's settings, drawn by Optuna."""
        def number(name, bounds, log_scale=False):
            if len(bounds) == 1:
                return bounds[0]
            return trial.suggest_float(name, *bounds, log=log_scale)

        def choice(name, choices):
            return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)

        return {"network": choice("network", self.network),
                "image_size": choice("image_size", self.image_size),
                "lr": number("lr", self.lr, log_scale=True),
                "augmentation": choice("augmentation", self.augmentation),
                "label_smoothing": number("label_smoothing", self.label_smoothing)}

    def searched(self):
        return {name: values for name, values in dataclasses.asdict(self).items()
                if len(values) > 1}


@dataclasses.dataclass(frozen=True)
class Base:
    """The recipe's own values of the searched settings (after its flags): where the search
    centres, and its first trial."""
    model: str
    image_size: int
    lr: float
    label_smoothing: float
    augmentation: dict  # the values of augmentation.BLOG's keys


def space(base, fixed, pretrained_networks, stream):
    """The Space around base; fixed, the names of the settings given explicitly;
    pretrained_networks, the keras.applications networks whose ImageNet weights are at hand;
    stream: the images are read from the cache batch by batch, so only base's size is at
    hand."""
    if fixed & {"model", "weights"}:
        networks_ = (base.model,)
    else:
        networks_ = (networks.DEFAULT, *(name for name in pretrained_networks if name !=
                                         networks.DEFAULT and networks.get(name).min_size
                                         <= base.image_size))
    smallest = max(networks.get(name).min_size for name in networks_)
    sizes = (base.image_size,) if "image_size" in fixed or stream else tuple(sorted({
        size for size in (int(round(base.image_size * factor / 8)) * 8
                          for factor in SIZE_FACTORS) if size >= smallest} | {base.image_size}))
    return Space(
        lr=(base.lr,) if "lr" in fixed else (base.lr * LR_FACTORS[0], base.lr * LR_FACTORS[1]),
        label_smoothing=((base.label_smoothing,) if "label_smoothing" in fixed
                         else LABEL_SMOOTHING),
        augmentation=((GIVEN,) if fixed & {*augmentation.BLOG, "augment"}
                      else tuple(augmentation.STRENGTHS)),
        image_size=sizes, network=networks_)


def baseline(base, space_):
    """The trial of the recipe's own settings: what a run without --tune would train."""
    strength = next((name for name, values in augmentation.STRENGTHS.items()
                     if values == base.augmentation), GIVEN)
    return {"network": base.model, "image_size": base.image_size, "lr": base.lr,
            "augmentation": strength if strength in space_.augmentation else GIVEN,
            "label_smoothing": base.label_smoothing}


def settings_of(settings, fixed):
    """The flag values (argparse names) that a trial's settings stand for; fixed, the names
    of the settings given explicitly."""
    values = {"model": settings["network"], "image_size": settings["image_size"],
              "lr": settings["lr"], "label_smoothing": settings["label_smoothing"]}
    if not fixed & {"model", "weights"}:
        values["weights"] = networks.get(settings["network"]).default_weights
    if settings["augmentation"] != GIVEN:
        values.update(augmentation.STRENGTHS[settings["augmentation"]])
    if "fine_tune_lr" not in fixed:
        values["fine_tune_lr"] = settings["lr"] / 10
    return values


def pretrained_networks(strategy_kind):
    """The keras.applications networks that can fine-tune under the strategy's kind."""
    def trains(name):
        try:
            networks.check_strategy(name, strategy_kind, pretrained=True)
            return True
        except UserError:
            return False
    return [name for name, network in networks.REGISTRY.items()
            if network.imagenet and trains(name)]


def pretrained_at_hand(candidates):
    """The networks among candidates whose ImageNet weights are in Keras's cache or can be
    downloaded into it now; the others are left out of the search, each said in one line."""
    found = []
    for name in candidates:
        try:
            networks.resolve_weights(name, "imagenet")
            found.append(name)
        except UserError as error:
            log.info("--tune leaves %s out: %s", name, error)
    return found


def describe(settings):
    """vgg, 64 px, lr 0.0007, augmentation blog, label smoothing 0.00"""
    return (f"{settings['network']}, {settings['image_size']} px, lr {settings['lr']:.2g}, "
            f"augmentation {settings['augmentation']}, label smoothing "
            f"{settings['label_smoothing']:.2f}")
