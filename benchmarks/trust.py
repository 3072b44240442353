"""How far a trained model's confidence can be trusted: the expected calibration error (15
bins) on the test part before and after temperature scaling, the accuracy/coverage trade-off
and the suggested --min-confidence, and how many photos of classes the model never saw it
answers 'unknown'.

    python benchmarks/trust.py train path/to/clothing-dataset-small --work trust-runs
    python benchmarks/trust.py measure trust-runs/blog-25 [--unseen FOLDER] [--pictures DIR]

train runs the plan: the blog recipe and the fast recipe, 25 epochs each, on train/ with the
official validation/ and test/ folders; and the fast recipe on five of the ten classes
(the first five by name), whose other five are the "never seen" photos (their test/ folders).
measure takes a finished run's output folder: it rebuilds the run's validation and test
parts from its config.json, fits the temperature on the validation part exactly as train.py
does (calibration.py), and prints one table row. A run made before calibration existed, or a
calibrated one, gives the same numbers: the temperature is refitted on the model's logits.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEEN = 5  # the first five classes by name train the "never seen" model
PLAN = {"blog-25": ([], None), "fast-25": (["--recipe", "fast"], None),
        "fast-25-five-classes": (["--recipe", "fast"], SEEN)}


def five_classes(data, work):
    """A copy of data of links: train/, validation/ and test/ with the first five classes."""
    root = os.path.join(work, "five-classes")
    for part in ("train", "validation", "test"):
        for name in sorted(os.listdir(os.path.join(data, part)))[:SEEN]:
            os.makedirs(os.path.join(root, part), exist_ok=True)
            link = os.path.join(root, part, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(data, part, name)), link)
    return root


def train(data, work):
    for name, (flags, classes) in PLAN.items():
        root = five_classes(data, work) if classes else data
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset",
                        os.path.join(root, "train"), "--val-dir",
                        os.path.join(root, "validation"), "--test-dir",
                        os.path.join(root, "test"), "--epochs", "25", *flags, "--output",
                        os.path.join(work, name), "--logs", os.path.join(work, "logs")],
                       check=True)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    unseen = sorted(os.listdir(os.path.join(data, "test")))[SEEN:]
    print("never seen by fast-25-five-classes: "
          + ", ".join(os.path.join(data, "test", name) for name in unseen))


def measure(output, unseen, pictures):
    import classifier  # noqa: F401  starts TensorFlow quietly
    import numpy as np

    from classifier import (artifacts, calibration, confidence_report, dataset, images,
                            pipelines, reports, settings)

    with open(os.path.join(output, "config.json")) as handle:
        config = json.load(handle)
    args = settings.parse_args([])
    vars(args).update({key: value for key, value in config.items() if key in vars(args)})
    labels = os.path.join(output, artifacts.LABELS_FILE)
    binarizer = artifacts.load_labels(labels)
    multi = args.multi_label
    folders, _ = dataset.load_folders(
        {"train": args.dataset, "validation": args.val_dir, "test": args.test_dir},
        dataset.Labelling(multi, args.label_separator, args.labels_csv,
                          args.csv_label_separator),
        dataset.Decoding(args.image_size, cache_dir=args.cache_dir), args.seed)
    splits = dataset.split(folders, binarizer,
                           artifacts.one_hot(binarizer, folders["train"].labels),
                           args.test_size, args.seed, in_memory=True,
                           val_size=getattr(args, "val_size", 0.0))
    model = artifacts.load_model(artifacts.model_path(None, labels))
    up_to_logits = calibration.logits_model(model)

    def logits_of(x, y):
        return calibration.view_logits(up_to_logits, pipelines.batches(x, y, 64))

    validation_logits = logits_of(splits.validation.x, splits.validation.y)[0]
    temperature = calibration.fit_temperature(validation_logits, splits.validation.y, multi)
    test_logits = logits_of(splits.test.x, splits.test.y)
    before, after = (reports.evaluate(calibration.view_probabilities(test_logits, multi, t),
                                      splits.test.y, multi, args.threshold)
                     for t in (1.0, temperature))
    row = {"run": os.path.basename(os.path.normpath(output)), "temperature": temperature,
           "test_accuracy": float(calibration.correct(after.probabilities, after.true, multi,
                                                      args.threshold).mean()),
           "mean_confidence_before": float(calibration.confidence(before.probabilities,
                                                                  multi).mean()),
           "mean_confidence_after": float(calibration.confidence(after.probabilities,
                                                                 multi).mean()),
           "ece_before": calibration.reliability(before.probabilities, before.true, multi)[1],
           "ece_after": calibration.reliability(after.probabilities, after.true, multi)[1]}
    # How much of the difference is the test part's sampling: 1,000 bootstrap resamples.
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(1000):
        pick = rng.integers(len(after.true), size=len(after.true))
        differences.append(
            calibration.reliability(after.probabilities[pick], after.true[pick], multi)[1]
            - calibration.reliability(before.probabilities[pick], before.true[pick], multi)[1])
    row["ece_change_95%_interval"] = np.percentile(differences, [2.5, 97.5]).round(4).tolist()
    # The part the temperature was fitted on: what it can do where it was fitted.
    for name, t in (("before", 1.0), ("after", temperature)):
        row[f"validation_ece_{name}"] = calibration.reliability(
            calibration.probabilities(validation_logits, multi, t),
            splits.validation.y if multi else splits.validation.y.argmax(axis=1), multi)[1]
    if multi:  # the alternative to one temperature for all labels: one per label
        per_label = np.array([calibration.fit_temperature(
            validation_logits[:, [label]], splits.validation.y[:, [label]], True)
            for label in range(validation_logits.shape[1])])
        row["temperature_per_label"] = per_label.round(3).tolist()
        row["ece_after_per_label_temperatures"] = calibration.reliability(
            calibration.view_probabilities(test_logits, True, per_label), after.true, True)[1]
    suggestion = calibration.suggest_min_confidence(after.probabilities, after.true, multi,
                                                    args.threshold)
    row["suggested_min_confidence"], row["coverage"], row["accuracy_answered"] = (
        suggestion or (None, None, None))
    if unseen:
        paths = images.list_images(unseen)
        pixels = np.stack([images.load_image(path, args.image_size) for path in paths])
        logits = logits_of(pixels, np.zeros((len(paths), 1), "float32"))
        for name, t in (("before", 1.0), ("after", temperature)):
            sure = calibration.view_probabilities(logits, False, t).max(axis=1)
            row[f"unseen_at_least_0.9_{name}"] = float((sure >= 0.9).mean())
            if suggestion:
                row[f"unseen_unknown_{name}"] = float((sure < suggestion[0]).mean())
        row["unseen_images"] = len(paths)
    if pictures:
        os.makedirs(pictures, exist_ok=True)
        confidence_report.save(before, after, temperature, len(splits.validation.y), pictures)
    print(json.dumps(row))
    return row


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runs = commands.add_parser("train", help="train the plan's models")
    runs.add_argument("data", help="a folder with train/, validation/ and test/")
    runs.add_argument("--work", default="trust-runs", help="where the runs go")
    figures = commands.add_parser("measure", help="measure a finished run")
    figures.add_argument("output", help="the run's output folder")
    figures.add_argument("--unseen", default=None,
                         help="a folder of photos of classes the model never saw")
    figures.add_argument("--pictures", default=None,
                         help="write calibration.png and coverage.png here")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "train":
        train(args.data, args.work)
    else:
        measure(args.output, args.unseen, args.pictures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
