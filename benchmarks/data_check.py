"""What the data check calls a copy, and what it costs.

    python benchmarks/data_check.py planted ../shared/data/clothing-dataset-small/train
    python benchmarks/data_check.py distances ../shared/data/clothing-dataset-small/train
    python benchmarks/data_check.py real ../shared/data/clothing-dataset-small
    python benchmarks/data_check.py cost ../shared/data/clothing-dataset-small/train --images 30000

distances: the check's thumbnail distance, and a perceptual hash's, between photos and their
variants, and between the closest different photos. planted: a folder of originals, each
beside planted variants (resized and re-encoded, re-encoded at JPEG quality 30, cropped by 3%
and 5% a side, mirrored; and colour variants that are not copies: hue turned by 30 and 120
degrees, grayscale); prints, per kind, the share of variants the check groups with their
original. real: the groups it finds in each of the
folder's parts checked together, with their paths. cost: the check on a folder of that many
images made by resizing and re-encoding the real photos, cold (decoding into a new cache)
and warm (the cache filled), timed apart from the decoding.
"""

import argparse
import os
import shutil
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classifier import data_check, dataset, images  # noqa: E402

COPIES = {
    "resized 50% + JPEG 90": lambda image: _jpeg(cv2.resize(image, None, fx=0.5, fy=0.5,
                                                            interpolation=cv2.INTER_AREA), 90),
    "JPEG quality 30": lambda image: _jpeg(image, 30),
    "cropped 3% a side": lambda image: _crop(image, 0.03),
    "cropped 5% a side": lambda image: _crop(image, 0.05),
    "mirrored": lambda image: image[:, ::-1],
}
NOT_COPIES = {
    "hue +30 degrees": lambda image: _hue(image, 30),
    "hue +120 degrees": lambda image: _hue(image, 120),
    "grayscale": lambda image: cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
                                            cv2.COLOR_GRAY2RGB),
}


def _jpeg(image, quality):
    _, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1]


def _crop(image, share):
    height, width = image.shape[:2]
    top, left = int(height * share), int(width * share)
    return image[top:height - top, left:width - left]


def _hue(image, degrees):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + degrees // 2) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _write(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])


def _check(roots, image_size, cache_dir):
    """(Findings, seconds of the check alone, seconds loading) for the folders roots."""
    started = time.perf_counter()
    folders, _ = dataset.load_folders(roots, dataset.Labelling(), dataset.Decoding(
        image_size, workers=os.cpu_count(), cache_dir=cache_dir), seed=42)
    loaded = time.perf_counter()
    findings = data_check.check(data_check.records_of(folders, False),
                                data_check.images_of(folders), image_size)
    return findings, time.perf_counter() - loaded, loaded - started


def planted(args):
    originals = images.list_images(args.data)
    chosen = np.random.default_rng(args.seed).choice(len(originals), args.originals,
                                                     replace=False)
    folder = os.path.join(args.work, "planted")
    shutil.rmtree(folder, ignore_errors=True)
    kinds = {**COPIES, **NOT_COPIES}
    for number, index in enumerate(chosen):
        image = images.decode_image(originals[index])
        label = images.label_of(originals[index], args.data)
        _write(os.path.join(folder, label, f"{number:04d}-original.jpg"), image)
        for kind_number, (kind, make) in enumerate(kinds.items()):
            _write(os.path.join(folder, label, f"{number:04d}-variant{kind_number}.jpg"),
                   make(image))
    findings, seconds, _ = _check({"train": folder}, args.image_size, None)
    group_of = {}
    for number, members in enumerate(findings.groups):
        for member in members:
            group_of[os.path.basename(findings.records[member].path)] = number
    print(f"{args.originals} originals from {args.data}, threshold {data_check.NEAR} "
          f"(mean |Lab| of {data_check.THUMBNAIL}-px thumbnails), {args.image_size} px, "
          f"check {seconds:.1f} s")
    for kind_number, kind in enumerate(kinds):
        found = sum(f"{number:04d}-original.jpg" in group_of and
                    group_of.get(f"{number:04d}-variant{kind_number}.jpg")
                    == group_of[f"{number:04d}-original.jpg"] for number in range(len(chosen)))
        role = "copy" if kind in COPIES else "not a copy"
        print(f"  {kind:24s} ({role}): grouped with its original {found}/{len(chosen)}")
    originals_together = sum(
        len({name.split("-")[0] for name in
             (os.path.basename(findings.records[member].path) for member in members)}) > 1
        for members in findings.groups)
    print(f"  groups joining two different originals: {originals_together}")


def distances(args):
    """The check's distance between each photo and its variants, and between the closest
    different photos of the folder (every pair within --hash-bits of each other by a 64-bit
    difference hash, imagehash's, and the hash distances of the variants beside)."""
    import imagehash
    from PIL import Image
    originals = images.list_images(args.data)
    chosen = np.random.default_rng(args.seed).choice(len(originals), args.originals,
                                                     replace=False)

    def small(image):
        return images.resize(image, args.image_size)

    def bits(image):
        return imagehash.dhash(Image.fromarray(image), 8).hash.ravel()

    def hash_distance(first, second):
        return min(np.sum(bits(first) != bits(second)),
                   np.sum(bits(first) != bits(second[:, ::-1])))

    def distance(first, second):
        """The check's distance: whole or cropped thumbnails, the second mirrored or not."""
        measured = []
        for other in (second, second[:, ::-1]):
            whole = (data_check.thumbnail(first), data_check.thumbnail(other))
            measured += [np.abs(whole[0] - whole[1]).mean(), data_check.cropped_distance(
                whole[0][None], data_check.crop_thumbnails(first)[None], whole[1][None],
                data_check.crop_thumbnails(other)[None])[0]]
        return min(measured)

    print(f"{args.originals} photos of {args.data}, {args.image_size} px: thumbnail distance "
          "(min / median / max) and difference-hash bits (median / max)")
    for kind, make in {**COPIES, **NOT_COPIES}.items():
        measured, hashed = [], []
        for index in chosen:
            image = images.decode_image(originals[index])
            first, second = small(image), small(make(image))
            measured.append(distance(first, second))
            hashed.append(hash_distance(first, second))
        print(f"  {kind:24s} {min(measured):5.2f} / {np.median(measured):5.2f} / "
              f"{max(measured):5.2f}   bits {np.median(hashed):4.0f} / {max(hashed):3.0f}")
    pictures = [small(images.decode_image(path)) for path in originals]
    packed = np.packbits(np.stack([bits(picture) for picture in pictures]), axis=1)
    mirrored = np.packbits(np.stack([bits(picture[:, ::-1]) for picture in pictures]), axis=1)
    close = []
    for index in range(len(pictures)):
        apart = np.minimum(np.unpackbits(packed[index] ^ packed[index + 1:], axis=1).sum(1),
                           np.unpackbits(packed[index] ^ mirrored[index + 1:], axis=1).sum(1))
        close += [(index, index + 1 + other) for other in np.flatnonzero(apart <= args.hash_bits)]
    measured = sorted(min(
        np.abs(data_check.thumbnail(pictures[a]) - data_check.thumbnail(
            pictures[b][:, ::-1] if flip else pictures[b])).mean() for flip in (False, True))
        for a, b in close)
    print(f"  {len(close)} pairs of the {len(pictures)} photos within {args.hash_bits} bits; "
          f"their thumbnail distances, smallest: {', '.join(f'{d:.2f}' for d in measured[:4])}")


def real(args):
    roots = {part: os.path.join(args.data, folder) for part, folder in
             (("train", "train"), ("validation", "validation"), ("test", "test"))
             if os.path.isdir(os.path.join(args.data, folder))} or {"train": args.data}
    findings, seconds, _ = _check(roots, args.image_size, None)
    print(findings.summary(), f"({seconds:.1f} s)")
    for number, members in enumerate(findings.groups):
        print(f"group {number} ({'identical' if findings.exact[number] else 'near'}):")
        for member in members:
            record = findings.records[member]
            print(f"    {record.part:10s} {record.label:12s} {record.path}")


def cost(args):
    originals = images.list_images(args.data)
    folder = os.path.join(args.work, f"cost-{args.images}")
    if not os.path.isdir(folder):
        rng = np.random.default_rng(args.seed)
        for number in range(args.images):
            path = originals[number % len(originals)]
            image = images.decode_image(path)
            scale = rng.uniform(0.3, 0.9)
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            label = images.label_of(path, args.data) or "images"
            _write(os.path.join(folder, label, f"{number:06d}.jpg"), _jpeg(
                image, int(rng.integers(60, 95))))
    cache = os.path.join(args.work, f"cache-{args.images}")
    shutil.rmtree(cache, ignore_errors=True)
    for state in ("cold", "warm", "warm"):
        findings, seconds, loading = _check({"train": folder}, args.image_size, cache)
        print(f"{args.images} images, {state} cache: loading {loading:.1f} s, check "
              f"{seconds:.1f} s; {len(findings.groups)} groups")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("planted", "distances", "real", "cost"))
    parser.add_argument("data", help="a folder of class sub-folders (real: with train/ etc.)")
    parser.add_argument("--originals", type=int, default=200, help="planted: photos to copy")
    parser.add_argument("--images", type=int, default=3000, help="cost: images in the folder")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hash-bits", type=int, default=10,
                        help="distances: pairs of photos this close by the hash")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/data_check_bench")
    args = parser.parse_args()
    {"planted": planted, "distances": distances, "real": real, "cost": cost}[args.mode](args)


if __name__ == "__main__":
    main()
