"""--tune against the fixed recipes given the same total wall time: one table.

    python benchmarks/tuning.py path/to/clothing-dataset-small --minutes 30
    python benchmarks/tuning.py path/to/a/folder/of/class/folders --minutes 8

A folder with train/, validation/ and test/ is trained on train/ with --val-dir and
--test-dir; any other folder is --dataset itself, with --val-size 0.15 and the 15% test
split. Each run is train.py in its own process, with its own output folder under --work:

1. --recipe fast --tune MINUTES: the search and the final run; its wall time T (the whole
   process), the settings chosen and the test accuracy of the final model;
2. --recipe fast, then the blog recipe, each for the epochs that fill T: T less the run's
   fixed cost (loading, the data check, evaluation and reports: T less the search and the
   final training), over the seconds per epoch of the search's first trial (the fast
   recipe's own settings, timed in the search). Their wall times are printed beside.
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_flags(data):
    if all(os.path.isdir(os.path.join(data, part)) for part in ("train", "validation", "test")):
        return ["--dataset", os.path.join(data, "train"), "--val-dir",
                os.path.join(data, "validation"), "--test-dir", os.path.join(data, "test")]
    return ["--dataset", data, "--val-size", "0.15"]


def run(name, flags, work):
    """train.py with flags in its own process: (wall seconds, its output folder, its log). A
    run already done in work (its <name>.json beside) is read back, not run again."""
    output = os.path.join(work, name)
    done = os.path.join(work, f"{name}.json")
    if os.path.exists(done):
        with open(os.path.join(work, f"{name}.log")) as handle:
            return json.load(open(done))["seconds"], output, handle.read()
    command = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--output", output,
               "--logs", os.path.join(work, "logs"), "--run-name", name,
               "--cache-dir", os.path.join(work, "cache")]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    with open(os.path.join(work, f"{name}.log"), "w") as handle:
        handle.write(result.stderr)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    with open(done, "w") as handle:
        json.dump({"seconds": seconds, "command": command}, handle)
    return seconds, output, result.stderr


def test_accuracy(output):
    with open(os.path.join(output, "classification_report.json")) as handle:
        report = json.load(handle)
    return report["accuracy"], report["macro avg"]["f1-score"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--minutes", type=float, default=30, help="--tune's budget")
    parser.add_argument("--work", default="benchmark-tuning", help="output folders")
    parser.add_argument("--only-search", action="store_true",
                        help="run the search alone, not the fixed recipes")
    args, extra = parser.parse_known_args(argv)
    os.makedirs(args.work, exist_ok=True)
    flags = [*data_flags(args.data), *extra]

    wall, output, log = run("tune", [*flags, "--recipe", "fast", "--tune", f"{args.minutes:g}"],
                            args.work)
    config = json.load(open(os.path.join(output, "config.json")))
    with open(os.path.join(output, "tuning.csv"), newline="") as handle:
        trials = list(csv.DictReader(handle))
    first = trials[0]
    per_epoch = float(first["seconds"]) / int(first["epochs"])
    trained = float(re.search(r"trained \d+ epochs in ([\d.]+) s", log).group(1))
    fixed_cost = wall - config["tuning"]["seconds"] - trained
    epochs = max(1, int((wall - fixed_cost) // per_epoch))
    rows = [("--recipe fast --tune", wall, config["epochs"], config["image_size"],
             *test_accuracy(output))]
    print(f"search: {len(trials)} trials in {config['tuning']['seconds'] / 60:.1f} min; "
          f"chosen: {json.dumps(config['tuning']['chosen'])}; the recipe's own settings "
          f"scored {first['validation_score']} on validation")
    print(f"T {wall:.0f} s, fixed cost {fixed_cost:.0f} s, {per_epoch:.1f} s per epoch "
          f"(trial 0): the fixed recipes get {epochs} epochs")
    if not args.only_search:
        for name, recipe in (("fast", ["--recipe", "fast"]), ("blog", [])):
            seconds, output, _ = run(name, [*flags, *recipe, "--epochs", str(epochs)],
                                     args.work)
            size = json.load(open(os.path.join(output, "config.json")))["image_size"]
            rows.append((f"--recipe {name}", seconds, epochs, size, *test_accuracy(output)))
    print("| run | wall time | epochs | image size | test accuracy | macro F1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seconds, run_epochs, size, accuracy, f1 in rows:
        print(f"| {name} | {seconds / 60:.1f} min | {run_epochs} | {size} | {accuracy:.3f} | "
              f"{f1:.3f} |")


if __name__ == "__main__":
    main()
