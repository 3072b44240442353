"""What the data check (data_check.py) found, as files in the output folder and as the
"Your data" section of report.html (or, with --check-only, a page of its own):
data_check.json (everything), duplicates.csv (a row per image in a group of copies) and
data_check.png (the groups side by side, conflicting labels first)."""

import html
import os

import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display
import matplotlib.pyplot as plt

from classifier import artifacts, reports

JSON = "data_check.json"
CSV = "duplicates.csv"
PICTURE = "data_check.png"
PAGE = "data_check.html"
GROUPS_SHOWN = 12
MEMBERS_SHOWN = 6
LISTED = 20  # file names named on the page for each kind of oddity


def save(findings, pictures, output, split_changed):
    """The files above, for findings on pictures (data_check.images_of); split_changed:
    whether keeping the groups whole made the split differ from a plain random one."""
    records = findings.records
    groups = [{"kind": "identical" if exact else "near", "conflicting_labels": number in
               findings.conflicts, "images": [vars(records[member]) for member in members]}
              for number, (members, exact) in enumerate(zip(findings.groups, findings.exact))]
    artifacts.write_json(os.path.join(output, JSON), {
        "images": len(records), "image_size": findings.image_size,
        "groups_of_copies": groups, "split_kept_groups_whole": split_changed,
        "copies_across_parts": [records[index].path for index in findings.leaks],
        "images_per_class": findings.class_counts, "tiny_classes": findings.tiny_classes,
        "rare_classes": findings.rare_classes,
        **{name: [{"path": records[index].path, "size": records[index].size}
                  for index in getattr(findings, name)]
           for name in ("small_images", "extreme_aspect", "grayscale")}})
    artifacts.write_csv(
        os.path.join(output, CSV),
        ["group", "kind", "conflicting_labels", "part", "label", "path"],
        [[number, group["kind"], group["conflicting_labels"], image["part"], image["label"],
          image["path"]] for number, group in enumerate(groups) for image in group["images"]])
    save_picture(findings, pictures, output)


def shown_groups(findings):
    """The groups data_check.png shows: conflicting labels first, then across parts, then
    the largest."""
    leaks = set(findings.leaks)
    order = sorted(range(len(findings.groups)), key=lambda number: (
        number not in findings.conflicts,
        not any(member in leaks for member in findings.groups[number]),
        -len(findings.groups[number])))
    return order[:GROUPS_SHOWN]


def save_picture(findings, pictures, output):
    shown = shown_groups(findings)
    rows = max(1, len(shown))
    columns = max([2] + [min(len(findings.groups[number]), MEMBERS_SHOWN) for number in shown])
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.3 + 0.4),
                                squeeze=False, layout="constrained")
    for axes in grid.flat:
        axes.axis("off")
    for row, number in enumerate(shown):
        members = findings.groups[number]
        fits = members if len(members) <= columns else members[:columns - 1]
        for column, member in enumerate(fits):
            record = findings.records[member]
            axes = grid[row, column]
            axes.imshow(pictures[member])
            conflict = number in findings.conflicts
            axes.set_title(f"{record.label}\n{record.part}: {_short(record.path)}", fontsize=7,
                           color="#c0392b" if conflict else "black")
        if len(fits) < len(members):
            grid[row, -1].text(0.1, 0.5, f"and {len(members) - len(fits)} more\n({CSV})",
                               fontsize=9)
    if not shown:
        grid[0, 0].text(0, 0.5, "No copies found.", fontsize=12)
    # Two lines: a row of two pictures is narrower than the title on one.
    figure.suptitle("Copies of one photo, a group per row\n(conflicting labels in red)",
                    fontsize=10)
    reports.save_figure(figure, os.path.join(output, PICTURE))


def _short(path, length=18):
    name = os.path.basename(path)
    return name if len(name) <= length else name[:length - 3] + "..."


def lines(findings, split_changed, leaked_accuracy=None):
    """The sentences of the "Your data" section. leaked_accuracy: (accuracy on every test
    image, on those without a copy in training (None: there are none), how many have one),
    where a pre-split test folder has copies of training images."""
    records = findings.records
    copies = sum(len(members) for members in findings.groups)
    exact = sum(findings.exact)
    said = [f"{len(records):,} images checked for copies: {_count(findings.groups, 'group')} "
            f"of copies ({copies} images): {exact} of identical images once decoded, "
            f"{len(findings.groups) - exact} with resized, re-encoded, mirrored or slightly "
            f"cropped copies; listed in {CSV}."]
    if findings.conflicts:
        said.append(f"{_count(findings.conflicts, 'group')} of copies with conflicting labels:"
                    " the same photo filed under different classes. One of the labels is "
                    "wrong.")
    if split_changed:
        said.append("The split keeps each group of copies within one part (training, "
                    "validation or test), so no test photo has a copy in training; it differs "
                    "from a plain random split only by that.")
    elif not findings.leaks:
        said.append("The split is the plain stratified random split: no group had to be kept "
                    "together.")
    if findings.leaks:
        said.append(f"{_count(findings.leaks, 'image')} of the given validation or test "
                    "folders with a copy in another part (the folders are used as given; "
                    f"nothing is moved): {_names(findings.leaks, records)}.")
    if leaked_accuracy:
        everything, without, leaked = leaked_accuracy
        said.append(f"Test accuracy {everything:.4f} on every test image, {without:.4f} "
                    f"without the {leaked} that have a copy in training." if without is not None
                    else f"Every test image has a copy in training: the test accuracy, "
                    f"{everything:.4f}, measures what the model has seen.")
    counts = ", ".join(f"{name} {count}" for name, count in findings.class_counts.items())
    said.append(f"Training images per class: {counts}.")
    if findings.tiny_classes:
        said.append(f"Classes with under 10 images, too few to learn or to test: "
                    f"{', '.join(findings.tiny_classes)}.")
    if findings.rare_classes:
        said.append(f"{'Labels' if findings.multi_label else 'Classes'} with under a fifth of "
                    f"the largest one's images: {', '.join(findings.rare_classes)}"
                    + ("." if findings.multi_label else
                       "; --class-weight balanced weighs their loss up."))
    for name, what in (("small_images", "much smaller than --image-size (upscaled, so "
                        "blurred)"), ("extreme_aspect", "with one side over 3 times the other "
                                      "(squashed into a square)"),
                       ("grayscale", "grayscale among colour photos")):
        found = getattr(findings, name)
        if found:
            said.append(f"{_count(found, 'image')} {what}: {_names(found, records)}.")
    return said


def _count(things, noun):
    return f"{len(things)} {noun}{'' if len(things) == 1 else 's'}"


def _names(indices, records):
    names = [os.path.basename(records[index].path) for index in indices[:LISTED]]
    more = f" and {len(indices) - LISTED} more" if len(indices) > LISTED else ""
    return ", ".join(names) + more


def section(said, label_issue_lines=(), folder=""):
    """The "Your data" section of a page: its sentences and pictures (files in the output
    folder, or in folder relative to the page)."""
    def picture(name, title):
        return (f'<p><img src="{html.escape(os.path.join(folder, name))}" '
                f'alt="{html.escape(title)}"></p>')

    from_label_issues = "".join(f"<p>{html.escape(line)}</p>" for line in label_issue_lines)
    return ("<h2>Your data</h2>\n" + "".join(f"<p>{html.escape(line)}</p>\n" for line in said)
            + picture(PICTURE, "Groups of copies")
            + (f"<h3>Photos whose label is probably wrong</h3>\n{from_label_issues}"
               + picture("label_issues.png", "Likely label issues") if label_issue_lines
               else ""))


def write_page(output, content):
    """data_check.html: the section alone, for --check-only."""
    reports.write_page(os.path.join(output, PAGE), "Data check", content)
