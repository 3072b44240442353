"""How many deliberately wrong labels --find-label-issues finds.

    python benchmarks/label_issues.py ../shared/data/clothing-dataset-small/train --flip 0.05 \\
        -- --test-dir ../shared/data/clothing-dataset-small/test

builds in --work a copy of the folder made of symbolic links (the photos themselves are never
touched), in which a --flip share of the photos, chosen at random, sits in a wrong class
folder, also chosen at random; flipped.csv lists them (path, true, given). Then it runs
train.py --check-only --find-label-issues on the copy, with any flags given after --, and
prints how many of the flipped photos the ranking in label_issues.csv puts in its top
2 x (photos flipped), the share of them (recall) and the precision of that top list, how many
it lists at all, and the wall time.

Only the training part is searched. Without --test-dir, train.py holds out --test-size of the
copy as its test part, and the flipped photos that land there can never be found: the recall
comes out lower by about that share.
"""

import argparse
import csv
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from classifier import images, label_issues  # noqa: E402

FLIPPED = "flipped.csv"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Measure how many deliberately wrong labels --find-label-issues finds.",
        epilog="flags after -- go to train.py, e.g. -- --test-dir FOLDER --epochs 5",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="folder with one sub-folder of photos per class")
    parser.add_argument("--flip", type=float, default=0.05,
                        help="share of the photos moved to a wrong class")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of which photos are flipped, and to which class")
    parser.add_argument("--work", default="/tmp/label_issues_bench",
                        help="folder for the copy, flipped.csv and train.py's outputs")
    return parser


def flipped_copy(data, work, share, seed):
    """<work>/dataset: data's class folders as links to its photos, a share of them in a
    wrong class; returns the copy's folder, the flipped photos' (link, true, given) rows, also
    written to <work>/flipped.csv, and the number of photos."""
    classes = sorted(name for name in os.listdir(data)
                     if os.path.isdir(os.path.join(data, name)) and not name.startswith("."))
    photos = [(name, photo) for name in classes
              for photo in sorted(os.listdir(os.path.join(data, name)))
              if not photo.startswith(".") and photo.lower().endswith(images.IMAGE_EXTENSIONS)]
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(photos)), round(share * len(photos))))
    copy = os.path.join(work, "dataset")
    shutil.rmtree(copy, ignore_errors=True)  # links only: a rerun starts from the photos
    for name in classes:
        os.makedirs(os.path.join(copy, name))
    rows = []
    for index, (true, photo) in enumerate(photos):
        given = rng.choice([name for name in classes if name != true]) if index in chosen \
            else true
        link = os.path.join(copy, given, photo)
        if os.path.lexists(link):  # a photo of the same name in the class it was moved to
            link = os.path.join(copy, given, f"{true}-{photo}")
        os.symlink(os.path.abspath(os.path.join(data, true, photo)), link)
        if given != true:
            rows.append((link, true, given))
    with open(os.path.join(work, FLIPPED), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "given"])
        writer.writerows(rows)
    return copy, rows, len(photos)


def ranked_photos(output):
    """The photos label_issues.csv lists, most likely wrong first, as the files they are."""
    with open(os.path.join(output, label_issues.FILE), newline="", encoding="utf-8") as handle:
        return [os.path.realpath(row["path"]) for row in csv.DictReader(handle)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    args = build_parser().parse_args(ours)
    os.makedirs(args.work, exist_ok=True)
    copy, flipped, photos = flipped_copy(args.data, args.work, args.flip, args.seed)
    output = os.path.join(args.work, "Output")
    started = time.perf_counter()
    code = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", copy,
                           "--check-only", "--find-label-issues", "--output", output, "--logs",
                           os.path.join(args.work, "logs"), *extra], cwd=ROOT).returncode
    if code:
        return code
    minutes = (time.perf_counter() - started) / 60
    # Links and the photos they point to alike: compared as the files they are.
    wrong = {os.path.realpath(link) for link, _, _ in flipped}
    ranking = ranked_photos(os.path.join(output, "check"))  # where --check-only writes
    top = ranking[:2 * len(flipped)]
    hits = len(wrong.intersection(top))
    print(f"flipped: {len(flipped)} of {photos} photos ({args.flip:.1%}), "
          f"list in {os.path.join(args.work, FLIPPED)}")
    print(f"flipped in the top {2 * len(flipped)} of the ranking: {hits} "
          f"(recall {hits / max(1, len(flipped)):.3f})")
    print(f"precision of that top list: {hits / max(1, len(top)):.3f} "
          f"({len(top)} photos listed there)")
    print(f"flipped found at all: {len(wrong.intersection(ranking))} of {len(flipped)}, "
          f"among {len(ranking)} likely label issues")
    print(f"wall time: {minutes:.1f} min")
    if "--test-dir" not in extra:
        print("no --test-dir: flipped photos in train.py's test part were never searched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
