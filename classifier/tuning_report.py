"""What a --tune search leaves for the user: tuning.csv (every trial), tuning.png (score
against time) and the "Search" section of report.html."""

import html
import os

import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display
import matplotlib.pyplot as plt

from classifier import artifacts, reports, search_space

CSV = "tuning.csv"
PLOT = "tuning.png"
COLUMNS = ("trial", "state", "chosen", "network", "image_size", "lr", "augmentation",
           "label_smoothing", "epochs", "validation_score", "seconds", "finished_after_seconds")


def save(search, output):
    """output/tuning.csv and output/tuning.png."""
    artifacts.write_csv(os.path.join(output, CSV), COLUMNS,
                        [_row(trial, trial is search.chosen) for trial in search.trials])
    save_plot(search, os.path.join(output, PLOT))


def _row(trial, chosen):
    settings = trial["settings"]
    return [trial["number"], trial["state"], "yes" if chosen else "", settings["network"],
            settings["image_size"], f"{settings['lr']:.6g}", settings["augmentation"],
            f"{settings['label_smoothing']:.4f}", trial["epochs"],
            "" if trial["score"] is None else f"{trial['score']:.4f}",
            _seconds(trial["seconds"]), _seconds(trial["finished"])]


def _seconds(value):
    return "" if value is None else f"{value:.1f}"


def save_plot(search, path):
    """Each trial's validation score at the minute it ended: filled when it ran all its
    epochs, hollow when stopped early (at the score it had then), the recipe's own (the first)
    framed, the chosen one starred; the line is the best complete score so far."""
    figure, axes = plt.subplots(figsize=(10, 4.5), layout="constrained")
    timed = sorted((trial for trial in search.trials
                    if trial["finished"] is not None and trial["score"] is not None),
                   key=lambda trial: trial["finished"])
    complete = [trial for trial in timed if trial["state"] == "complete"]
    stopped = [trial for trial in timed if trial["state"] != "complete"]
    if stopped:
        axes.scatter([t["finished"] / 60 for t in stopped], [t["score"] for t in stopped],
                     facecolors="none", edgecolors="tab:gray",
                     label="stopped early (score then)")
    axes.scatter([t["finished"] / 60 for t in complete], [t["score"] for t in complete],
                 color="tab:blue", label="ran all its epochs")
    best, steps = None, ([], [])
    for trial in complete:
        best = trial["score"] if best is None else max(best, trial["score"])
        steps[0].append(trial["finished"] / 60)
        steps[1].append(best)
    if steps[0]:
        axes.step([*steps[0], search.seconds / 60], [*steps[1], steps[1][-1]], where="post",
                  color="tab:blue", alpha=0.5, label="best so far")
    first = search.baseline
    if first and first["finished"] is not None and first["score"] is not None:
        axes.scatter([first["finished"] / 60], [first["score"]], marker="s", s=70,
                     facecolors="none", edgecolors="black", zorder=3,
                     label="the recipe's own settings")
    chosen = search.chosen
    if chosen["finished"] is not None:
        axes.scatter([chosen["finished"] / 60], [chosen["score"]], marker="*", s=260,
                     color="tab:orange", zorder=3, label=f"chosen: trial {chosen['number']}")
    axes.axvline(search.budget_minutes, color="tab:red", linestyle=":", label="budget")
    axes.set_xlabel("minutes into the search")
    axes.set_ylabel(f"validation score ({search.monitor})")
    axes.set_title(f"Search: {len(search.trials)} trials in {search.seconds / 60:.1f} min")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside: no point hidden
    axes.grid(alpha=0.3)
    reports.save_figure(figure, path)


def fact(search):
    """The search in a few words, for the table at the top of report.html."""
    return (f"trial {search.chosen['number']} of {len(search.trials)} chosen in "
            f"{search.seconds / 60:.1f} min" + (" (the recipe's own settings)"
                                                if search.chosen is search.baseline else ""))


def lines(search):
    """What the search did and chose, in words."""
    states = [trial["state"] for trial in search.trials]
    complete, cut = states.count("complete"), states.count("interrupted") + states.count("failed")
    chosen, first = search.chosen, search.baseline
    said = [f"{len(states)} trials in {search.seconds / 60:.1f} of {search.budget_minutes:g}"
            f" minutes: {complete} ran all their epochs, {len(states) - complete - cut} were "
            "stopped early (successive halving, the budget, or memory)"
            + (f", {cut} were interrupted or failed" if cut else "") + ". Each was scored on "
            "the validation part only; the test part was not used.",
            f"Chosen: trial {chosen['number']} ({search_space.describe(chosen['settings'])}), "
            f"{search.monitor} {chosen['score']:.4f} on the validation part."]
    if first and first["score"] is not None and first is not chosen:
        said.append(f"The recipe's own settings (trial {first['number']}: "
                    f"{search_space.describe(first['settings'])}) scored {first['score']:.4f}.")
    searched = search.space.searched()
    said.append("Searched: " + ("; ".join(f"{name} {_values(values)}"
                                         for name, values in searched.items())
                                if searched else "nothing: every setting was given") + ".")
    return said


def _values(values):
    if isinstance(values[0], float) and len(values) == 2:
        return f"{values[0]:.2g} to {values[1]:.2g}"
    return ", ".join(str(value) for value in values)


def section(search):
    """The "Search" section of report.html: the lines, the picture and every trial."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in COLUMNS[:-1])
    rows = []
    for trial in search.trials:
        settings = trial["settings"]
        cells = [trial["number"], trial["state"], "chosen" if trial is search.chosen else "",
                 settings["network"], settings["image_size"], f"{settings['lr']:.3g}",
                 settings["augmentation"], f"{settings['label_smoothing']:.2f}", trial["epochs"],
                 "" if trial["score"] is None else f"{trial['score']:.4f}",
                 _seconds(trial["seconds"])]
        style = ' style="background:#fff3cd"' if trial is search.chosen else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(cell))}</td>"
                                             for cell in cells) + "</tr>")
    return ("<h2>Search (--tune)</h2>\n"
            + "".join(f"<p>{html.escape(line)}</p>" for line in lines(search))
            + f'\n<p><img src="{PLOT}" alt="validation score against time"></p>'
            + f"\n<table><tr>{header}</tr>{''.join(rows)}</table>"
            + f'\n<p>Every trial: <a href="{CSV}">{CSV}</a></p>')
