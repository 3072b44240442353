"""How a trained model labels a batch of images, the same in the test report, predict.py and
serve.py: its probabilities, or with test-time augmentation (--tta) the mean of those of
the images and of their mirror images."""


def probabilities(model, images, tta=False):
    """One row of probabilities per image of images, a float32 batch as images.load_image
    gives them (N x size x size x 3)."""
    found = _predict(model, images)
    if tta:
        found = (found + _predict(model, images[:, :, ::-1])) / 2
    return found


def _predict(model, images):
    # predict_on_batch gives predict's numbers without predict's set-up of a data pipeline
    # for every call (75 ms on two cores, more than the model takes for a few images: what
    # serve.py pays per request). But under a MirroredStrategy (--devices) it hands every
    # replica the whole batch and returns each replica's rows, where predict splits it.
    if model.distribute_strategy.num_replicas_in_sync > 1:
        return model.predict(images, batch_size=len(images), verbose=0)
    return model.predict_on_batch(images)


def add_tta_flag(parser):
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: each image's probabilities averaged "
                             "with its mirror image's")


def add_answer_flags(parser, unknown):
    """The flags that turn probabilities into an answer, the same in predict.py and
    serve.py: --threshold for multi-label models, --min-confidence for unknown."""
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="multi-label models: answer every label whose probability "
                             "reaches this")
    parser.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                        help=f"answer '{unknown}' when the top probability is under P (multi-"
                             "label models: when any label's yes or no is less sure than P); "
                             "report.html suggests a P")
