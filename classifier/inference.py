"""How a trained model labels a batch of images, the same in the test report and in
predict.py: its probabilities, or with test-time augmentation (--tta) the mean of those of
the images and of their mirror images."""


def probabilities(model, images, tta=False):
    """One row of probabilities per image of images, a float32 batch as images.load_image
    gives them (N x size x size x 3)."""
    # predict, not predict_on_batch: under a MirroredStrategy (--devices) predict_on_batch
    # hands every replica the whole batch and returns each replica's rows.
    found = model.predict(images, batch_size=len(images), verbose=0)
    if tta:
        found = (found + model.predict(images[:, :, ::-1], batch_size=len(images),
                                       verbose=0)) / 2
    return found


def add_tta_flag(parser):
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: each image's probabilities averaged "
                             "with its mirror image's")
