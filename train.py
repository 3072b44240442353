"""Train the blog's VGG-style classifier, or another network (--model), on a folder of
images, one sub-folder per class.

    python train.py --dataset Dataset

The blog's four steps, top to bottom: load the data, configure the model, train, evaluate
and save; each a few calls, their details in the modules of classifier/. What a run leaves
in the output folder and logs/: README.md, "What lands in Output/ and logs/".
"""

import argparse
import dataclasses
import functools
import logging
import os
import sys
import time

import classifier  # noqa: F401  first: it starts TensorFlow quietly, before keras does (cli.py)
import keras
import numpy as np
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from classifier import (artifacts, augmentation, calibration, callbacks, cli,
                        confidence_report, data_check, data_report, dataset, distributed,
                        fine_tuning, hardware, images, label_issues, multi_worker, networks,
                        pipelines, reports, run_folder, schedules, search_space, settings,
                        tuning, tuning_report)

log = logging.getLogger("train")
CHECK_FOLDER = "check"  # where --check-only writes, inside --output


def load_data(args, output):
    """1. Load the data: list and label the images, decode and resize them (cached), check
    them for copies and oddities (data_check.py, its files: data_report.py), binarize the
    labels, split off the test images keeping copies together (or take the pre-split
    folders)."""
    folders, skipped = dataset.load_folders(
        {"train": args.dataset, "validation": args.val_dir, "test": args.test_dir},
        dataset.Labelling(args.multi_label, args.label_separator, args.labels_csv,
                          args.csv_label_separator),
        decoding(args, args.image_size), args.seed)
    if not args.lr_find:  # a range test leaves a run's files as they are
        dataset.save_skipped(skipped, output)
    findings = data_check.check(data_check.records_of(folders, args.multi_label),
                                data_check.images_of(folders), args.image_size,
                                args.multi_label)
    log.info("%s (details: %s)", findings.summary(), data_report.JSON)
    binarizer, targets = artifacts.fit_binarizer(folders["train"].labels, args.multi_label)
    data_mode = hardware.choose_data_mode(args.data_mode, dataset.size_in_bytes(folders),
                                          hardware.available_memory())
    splits = dataset.split(folders, binarizer, targets, args.test_size, args.seed,
                           in_memory=data_mode == "memory", val_size=args.val_size,
                           groups=findings.group_numbers("train"))
    classes = [str(name) for name in binarizer.classes_]
    log.info("%d %s: %s", len(classes), "labels" if args.multi_label else "classes", ", ".join(
        f"{name} ({count:.0f})" for name, count in zip(classes, targets.sum(axis=0))))
    log.info("training on %d images, validating on %d%s, testing on %d", len(splits.train.x),
             len(splits.validation.x), "" if splits.has_validation else " (the test split)",
             len(splits.test.x))
    # Copies within --dataset change the split only where it splits --dataset.
    split_changed = ("test" not in folders or bool(args.val_size)) and findings.copies_within(
        "train")
    if not args.lr_find:
        data_report.save(findings, data_check.images_of(folders), output, split_changed)
    return binarizer, classes, splits, data_mode, Checked(findings, split_changed)


def decoding(args, size):
    """How images are decoded, at size x size (the run's --image-size, or a trial's)."""
    return dataset.Decoding(size, args.max_pixels, args.workers,
                            None if args.no_cache else args.cache_dir)


@dataclasses.dataclass
class Checked:
    """What the data check found, and (--find-label-issues) the lines about labels that
    are probably wrong."""
    findings: data_check.Findings
    split_changed: bool  # groups of copies kept whole made the split differ from today's
    label_issue_lines: tuple = ()


def find_label_issues(args, output, strategy, classes, splits, checked, make_model, augment):
    """1. Load the data, --find-label-issues: each training image's probabilities from a
    model trained on the other folds (never on the test part), ranked by cleanlab.
    make_model() gives a new model, untrained, and its fine_tuning phases."""
    started = time.perf_counter()

    def fit_and_predict(train_at, held_at):
        model, phases = make_model()
        fit_quietly(args, model, strategy, phases, augment, dataset.Split(
            dataset.take(splits.train.x, train_at, in_memory=False),  # as it is
            splits.train.y[train_at], None))
        return model.predict(pipelines.batches(dataset.take(splits.train.x, held_at, False),
                                               splits.train.y[held_at], args.batch_size),
                             verbose=0)

    probabilities = label_issues.out_of_sample_probabilities(
        splits.train.y, args.label_issue_folds, args.seed, fit_and_predict)
    issues = label_issues.find(splits.train.y, probabilities, args.multi_label)
    label_issues.save(issues, splits.train.paths, splits.train.y, probabilities, classes,
                      output, args.multi_label)
    label_issues.save_gallery(splits.train.x, issues, splits.train.paths, splits.train.y,
                              probabilities, classes, output)
    checked.label_issue_lines = label_issues.lines(
        issues, len(splits.train.y), args.label_issue_folds, args.label_issue_epochs,
        time.perf_counter() - started)
    log.info("%d likely label issues among %d training images (%s)", len(issues),
             len(splits.train.y), label_issues.FILE)


def fit_quietly(args, model, strategy, phases, augment, train, validation=None, callbacks=(),
                class_weight=None):
    """3. Train, a model of its own (--find-label-issues, --tune): model.fit phase by phase on
    train (a dataset.Split), scored on validation if given, with callbacks and none of the
    run's files."""
    steps = pipelines.steps_per_epoch(len(train.y), args.batch_size)
    for phase in phases:
        fine_tuning.set_trainable(model, phase.trains)
        compile_model(args, model, strategy, phase.lr, phase.epochs, steps)
        model.fit(pipelines.training_batches(train.x, train.y, args.batch_size, augment,
                                             args.seed, first_epoch=phase.start,
                                             mix=augmentation.mixing(args.mix, args.seed)),
                  steps_per_epoch=steps, initial_epoch=phase.start, epochs=phase.end,
                  validation_data=validation and pipelines.batches(
                      validation.x, validation.y, args.batch_size),
                  class_weight=class_weight, callbacks=list(callbacks), shuffle=False,
                  verbose=0)
        if model.stop_training:
            return


def check_search_budget(args, strategy, policy, build_model):
    """2. Configure the model, --tune: refuse a budget too small for one trial of the
    recipe's own settings, its training steps timed on random images, before any image is
    loaded."""
    found = len(images.list_images(args.dataset))
    training = found * (1 if args.test_dir else 1 - args.test_size) - (
        0 if args.val_dir else found * args.val_size)
    model, _ = configure_model(args, ["a", "b"], strategy, policy, None, build_model)
    step = tuning.seconds_per_step(model, args.image_size, args.batch_size, 2)
    tuning.check_budget(args.tune, step * args.epochs * pipelines.steps_per_epoch(
        max(1, round(training)), args.batch_size), args.epochs)


def search_settings(args, output, strategy, policy, classes, splits, data_mode, build_model,
                    class_weight):
    """2. Configure the model, --tune: search the settings on the validation part only
    (tuning.py), each trial a new model trained for --epochs as the final run would train.
    Returns args with the chosen settings, the splits at the chosen image size, and the
    search."""
    fixed = set(args.tune_fixed)
    base = search_space.Base(args.model, args.image_size, args.lr, args.label_smoothing,
                       {key: getattr(args, key) for key in augmentation.BLOG})

    def make_space():
        candidates = [] if fixed & {"model", "weights"} else search_space.pretrained_at_hand(
            search_space.pretrained_networks(distributed.kind(strategy)))
        return search_space.space(base, fixed, candidates, stream=data_mode == "stream")

    part_at = dataset.AtSizes(splits, args.image_size, lambda size: decoding(args, size))

    def with_settings(settings):
        return argparse.Namespace(**{**vars(args), **search_space.settings_of(settings, fixed)})

    def train_trial(settings, callback):
        trial_args = with_settings(settings)
        # Each model built adds to Keras's global state, which slows the next ones down.
        keras.backend.clear_session()
        keras.utils.set_random_seed(args.seed)
        weights = networks.resolve_weights(trial_args.model, trial_args.weights)
        model, new_head = configure_model(trial_args, classes, strategy, policy, weights,
                                          build_model)
        # The final run's own schedule: its plateau steps and early stopping.
        schedule = ([keras.callbacks.ReduceLROnPlateau(**plateau(args))]
                    if args.schedule == "plateau" else [])
        fit_quietly(trial_args, model, strategy, fine_tuning.plan(
            bool(weights), new_head, args.epochs, args.head_epochs, trial_args.lr,
            trial_args.fine_tune_lr), configure_augmentation(trial_args),
            part_at("train", settings["image_size"]),
            part_at("validation", settings["image_size"]),
            [*schedule, *callbacks.early_stopping(args.early_stopping), callback], class_weight)

    search = tuning.search(
        train_trial, make_space, lambda space: search_space.baseline(base, space),
        os.path.join(output, tuning.FOLDER), args.tune, args.tune_trials, args.seed,
        args.epochs, "val_binary_accuracy" if args.multi_label else "val_accuracy",
        tuning.fingerprint([run_folder.resume_settings(args),
                            dataset.split_rows(splits, classes)]), fresh=args.fresh)
    tuning_report.save(search, output)
    chosen = with_settings(search.chosen["settings"])
    size = chosen.image_size  # the test part is read at it only now, after the search
    return chosen, dataset.Splits(part_at("train", size), part_at("validation", size),
                                  part_at("test", size), splits.has_validation), search


def configure_augmentation(args):
    """2. Configure the model: its augmentation, Keras layers or the blog's
    ImageDataGenerator (--augment)."""
    if args.augment != "generator":
        return augmentation.layers(
            args.augment, args.seed, args.rotation_range, args.width_shift_range,
            args.height_shift_range, args.shear_range, args.zoom_range, args.horizontal_flip)
    return ImageDataGenerator(
        rotation_range=args.rotation_range, width_shift_range=args.width_shift_range,
        height_shift_range=args.height_shift_range, shear_range=args.shear_range,
        zoom_range=args.zoom_range, horizontal_flip=args.horizontal_flip, fill_mode="nearest")


def configure_model(args, classes, strategy, policy, weights, build_model):
    """2. Configure the model: the network (--model, vgg.py's by default), or the model
    --init-from names. Returns it, and whether the network got a new output layer on top of
    pretrained weights."""
    with distributed.model_scope(strategy):
        if args.init_from:
            return fine_tuning.start_from(args.init_from, classes, args.multi_label, policy)
        with hardware.dtype_policy(policy):  # layers take the dtype policy when built
            model = build_model(args.model, (args.image_size, args.image_size, 3), len(classes),
                                multi_label=args.multi_label, weights=weights,
                                bn_momentum=args.bn_momentum,
                                synchronized_bn=strategy.num_replicas_in_sync > 1)
    return model, True


def compile_model(args, model, strategy, lr, epochs, steps_per_epoch):
    """2. Configure the model: its loss, metrics and optimizer, for epochs epochs at lr (the
    peak of one cycle with --schedule onecycle)."""
    with distributed.model_scope(strategy):
        loss, metrics = schedules.loss_and_metrics(args.multi_label, args.label_smoothing,
                                                   args.threshold)
        # --lr-find sets the rate itself step by step.
        rate = schedules.learning_rate("plateau" if args.lr_find else args.schedule, lr, epochs,
                                       args.warmup_epochs, steps_per_epoch)
        model.compile(optimizer=schedules.optimizer(args.optimizer, rate, args.weight_decay),
                      loss=loss, metrics=metrics)


def plateau(args):
    """ReduceLROnPlateau's settings (--schedule plateau), for the run and each trial alike."""
    return {"monitor": "val_loss", "factor": args.lr_factor, "patience": args.lr_patience,
            "min_lr": args.min_lr}


def configure_callbacks(args, output, logs, run_name, phase, last_phase, append_history,
                        extra_callbacks):
    """2. Configure the model, its callbacks for one phase of training: the blog's, each
    able to resume (callbacks.py); where a phase leads to another, it keeps its last
    weights for that one."""
    backup = os.path.join(output, phase.backup)
    os.makedirs(backup, exist_ok=True)
    return [
        # First, so that the learning rate it sets is the one the loggers and the backup see.
        callbacks.ReduceLROnPlateau(os.path.join(backup, "plateau.json"), **plateau(args),
                                    verbose=1)
        if args.schedule == "plateau" else callbacks.LearningRateLog(),
        callbacks.TerminateOnNaN(),
        *(callbacks.early_stopping(args.early_stopping) if last_phase else []),
        callbacks.ModelCheckpoint(os.path.join(output, run_folder.CHECKPOINTS), args.model,
                                  every=args.checkpoint_every, keep=args.keep_checkpoints,
                                  monitor="val_loss", save_best_only=args.checkpoint_best_only),
        keras.callbacks.TensorBoard(log_dir=os.path.join(logs, run_name)),
        keras.callbacks.CSVLogger(os.path.join(output, run_folder.HISTORY_FILE),
                                  append=append_history),
        *extra_callbacks,
        *([] if last_phase else [callbacks.SaveWeightsAtEnd(
            os.path.join(output, run_folder.HEAD_WEIGHTS))]),
        # Last: the backup of an epoch is complete only once everything above has run.
        callbacks.BackupAndRestore(backup, double_checkpoint=True),
    ]


def train_model(args, output, logs, run_name, strategy, model, augment, splits, class_weight,
                phases, first_epoch, extra_callbacks):
    """3. Train: model.fit, phase by phase from first_epoch. Returns the seconds it took, and
    the exit code of what stopped it early (Ctrl-C 130, SIGTERM 143), or 0."""
    training = functools.partial(pipelines.training_batches, splits.train.x, splits.train.y,
                                 args.batch_size, augment, args.seed,
                                 mix=augmentation.mixing(args.mix, args.seed))
    validation = functools.partial(pipelines.batches, splits.validation.x, splits.validation.y,
                                   args.batch_size)
    steps = pipelines.steps_per_epoch(len(splits.train.x), args.batch_size)
    started = time.perf_counter()
    try:
        for phase in (phase for phase in phases if phase.end > first_epoch):
            fine_tuning.begin(model, phase, phases, first_epoch, output)
            compile_model(args, model, strategy, phase.lr, phase.epochs, steps)
            callback_list = configure_callbacks(
                args, output, logs, run_name, phase, phase is phases[-1],
                append_history=max(first_epoch, phase.start) > 0,
                extra_callbacks=extra_callbacks)
            start = max(first_epoch, phase.start)
            verbose = 1 if sys.stdout.isatty() else 2  # a progress bar, or a line an epoch
            if distributed.is_multi_worker(strategy):
                multi_worker.fit(strategy, model, training, steps, validation, phase.end, start,
                                 class_weight, callback_list, verbose)
            else:
                # shuffle=False: the pipeline reshuffles itself each epoch.
                model.fit(training(start), steps_per_epoch=steps, validation_data=validation(),
                          initial_epoch=start, epochs=phase.end, shuffle=False,
                          class_weight=class_weight, callbacks=callback_list, verbose=verbose)
            if model.stop_training:  # early stopping, or a NaN loss
                break
    except KeyboardInterrupt as interruption:
        log.warning("interrupted: saving the model and reports of the epochs done; run the "
                    "same command again to resume from the last completed epoch")
        return time.perf_counter() - started, cli.stop_code(interruption)
    return time.perf_counter() - started, 0


def evaluate_and_save(args, output, model, classes, splits, summary, checked, search=None):
    """4. Evaluate and save: the probabilities calibrated on the validation part, the model,
    the report on the test split (also without the test images that have a copy in
    training), the plots, report.html (with the --tune search's section); summary gets the
    test accuracy and the model's path."""
    up_to_logits = calibration.logits_model(model)
    test_logits = calibration.view_logits(
        up_to_logits, pipelines.batches(splits.test.x, splits.test.y, args.batch_size),
        args.tta)
    if splits.has_validation:
        summary.temperature = calibration.fit_temperature(calibration.view_logits(
            up_to_logits, pipelines.batches(splits.validation.x, splits.validation.y,
                                            args.batch_size))[0],
            splits.validation.y, args.multi_label)
        model = calibration.with_temperature(model, summary.temperature, args.multi_label)
    else:
        log.warning("no validation part (--val-dir, --val-size): the probabilities are not "
                    "calibrated")
    before, after = (reports.evaluate(
        calibration.view_probabilities(test_logits, args.multi_label, temperature),
        splits.test.y, args.multi_label, args.threshold)
        for temperature in (1.0, summary.temperature or 1.0))
    summary.model = artifacts.save_model(model, output, args.model)
    text, scores, summary.test_accuracy = reports.save_test_reports(
        after, splits.test.x, classes, output, model)
    trust = confidence_report.save(before, after if summary.temperature else None,
                                   summary.temperature, len(splits.validation.x), output)
    history = run_folder.read_history(output)
    if history:
        reports.save_training_plot(history, output)
    leaked = checked.findings.leaked("test")
    leaked_accuracy = None
    if len(leaked):
        unseen = np.setdiff1d(np.arange(len(splits.test.y)), leaked)
        leaked_accuracy = (summary.test_accuracy,
                           reports.accuracy(after, unseen) if len(unseen) else None, len(leaked))
        log.warning("%d of %d test images have a copy in training: the test accuracy counts "
                    "what the model has seen (report.html, Your data)", len(leaked),
                    len(splits.test.y))
    facts = summary.facts()
    if search:
        facts["search (--tune)"] = tuning_report.fact(search)
    reports.write_html(output, facts, scores, trust, data_report.section(
        data_report.lines(checked.findings, checked.split_changed, leaked_accuracy),
        checked.label_issue_lines), search and tuning_report.section(search))
    print(text)
    print(f"report: {os.path.join(output, reports.HTML)}")


def run(args, extra_callbacks=(), build_model=networks.create, policy=None):
    """The four steps; returns the run's reports.RunSummary (--lr-find: the range test and its
    plot). extra_callbacks go to fit (before the backup); build_model builds the network like
    networks.create; policy, a Keras dtype policy, overrides the one --precision chooses."""
    strategy = distributed.choose_strategy(args.strategy, args.devices, args.worker_addresses,
                                           args.worker_index)
    # Before any image is loaded or file written: a missing weights file is one line, at once.
    weights = networks.resolve_weights(args.model, args.weights)
    networks.check_strategy(args.model, distributed.kind(strategy),
                            pretrained=bool(weights or args.init_from))
    output, logs = distributed.folders(strategy, args.output, args.logs)
    if args.check_only:  # its own folder: an earlier run's files stay as they are
        output = os.path.join(output, CHECK_FOLDER)
    policy = policy or hardware.choose_precision(args.precision, hardware.gpu_capabilities(),
                                                 hardware.cpu_flags())
    with run_folder.output_lock(output):  # one run per output folder, from before it reads
        run_folder.prepare_folders(output, None if args.check_only else logs)
        if args.tune:
            check_search_budget(args, strategy, policy, build_model)
        keras.utils.set_random_seed(args.seed)

        binarizer, classes, splits, data_mode, checked = load_data(args, output)

        augment = configure_augmentation(args)
        if args.find_label_issues:
            def untrained_model():
                model, new_head = configure_model(args, classes, strategy, policy, weights,
                                                  build_model)
                return model, fine_tuning.plan(
                    bool(weights or args.init_from), new_head, args.label_issue_epochs,
                    args.head_epochs, args.lr, args.fine_tune_lr)
            find_label_issues(args, output, strategy, classes, splits, checked,
                              untrained_model, augment)
        split_rows = dataset.split_rows(splits, classes)
        if args.check_only:
            data_report.write_page(output, data_report.section(
                data_report.lines(checked.findings, checked.split_changed),
                checked.label_issue_lines))
            return os.path.join(output, data_report.PAGE)
        class_weight = (dataset.class_weights(splits.train.y, classes)
                        if args.class_weight == "balanced" else None)
        search = None
        if args.tune:
            args, splits, search = search_settings(args, output, strategy, policy, classes,
                                                   splits, data_mode, build_model, class_weight)
            keras.backend.clear_session()
            augment = configure_augmentation(args)
            weights = networks.resolve_weights(args.model, args.weights)
            keras.utils.set_random_seed(args.seed)
        model, new_head = configure_model(args, classes, strategy, policy, weights, build_model)
        phases = fine_tuning.plan(bool(weights or args.init_from), new_head, args.epochs,
                                  args.head_epochs, args.lr, args.fine_tune_lr)
        if args.lr_find:  # instead of steps 3 and 4: the range test, which saves no model
            fine_tuning.begin(model, phases[0], phases[:1], 0, output)
            compile_model(args, model, strategy, phases[0].lr, phases[0].epochs, 1)
            return schedules.find_learning_rate(model, pipelines.training_batches(
                splits.train.x, splits.train.y, args.batch_size, augment, args.seed,
                mix=augmentation.mixing(args.mix, args.seed)), output)
        run_folder.check_free_space(model, output, args.epochs, args.keep_checkpoints)
        run_name, first_epoch = run_folder.resume_point(
            run_folder.resume_settings(args), args.run_name, args.fresh, output,
            fine_tuning.head_epochs(phases))
        if first_epoch:
            dataset.check_same_split(split_rows, output)
        dataset.save_split(split_rows, output)
        summary = reports.RunSummary.of(args, output, os.path.join(logs, run_name), classes,
                                        splits, data_mode, policy)
        log.info("images %s, %s precision", "in memory" if data_mode == "memory"
                 else f"streamed from {args.cache_dir}", policy)
        # What predict.py needs beside the model, and what this run is.
        artifacts.save_labels(binarizer, output, args.image_size, args.model,
                              started_from=args.init_from or args.weights)
        reports.save_overview(classes, splits.train, splits.test, splits.validation
                              if splits.has_validation else None, output)
        settings.write_config(args, output, output=output, logs=logs, run_name=run_name,
                              classes=classes, train_images=summary.training_images,
                              test_images=summary.test_images, data_mode=data_mode,
                              precision=policy, validation_images=len(splits.validation.x),
                              class_weights=class_weight,
                              **({"tuning": search.config()} if search else {}))

        summary.seconds, summary.interrupted = train_model(
            args, output, logs, run_name, strategy, model, augment, splits, class_weight,
            phases, first_epoch, extra_callbacks)
        history = run_folder.read_history(output)
        run_folder.raise_if_diverged(history, output, args.lr)
        summary.epochs_run = len(history.get("loss", []))
        log.info("trained %d epochs in %.1f s", summary.epochs_run, summary.seconds)

        evaluate_and_save(args, output, model, classes, splits, summary, checked, search)
    return summary


def main(argv=None, **run_options):
    """Parse the flags, run, and turn what can go wrong into one line and an exit code.
    run_options go to run()."""
    argv = sys.argv[1:] if argv is None else argv
    cli.setup_logging()

    def parse_and_run():
        args = settings.parse_args(argv)
        cli.setup_logging(args.verbose)
        summary = run(args, **run_options)
        if args.check_only:
            print(f"data check: {summary}")
            return 0
        if args.lr_find:
            test, plot = summary
            print(f"learning-rate range test: {len(test.rates)} steps, plot: {plot}")
            print(f"suggested learning rate: --lr {test.suggestion():.2g}")
            return 0
        print(f"model: {summary.model}")
        print(f"reports and plots: {summary.output}")
        logs = os.path.dirname(summary.tensorboard_run) or "."
        print(f"TensorBoard: tensorboard --logdir {logs}")
        print(f"test {'exact-match ' if summary.multi_label else ''}accuracy: "
              f"{summary.test_accuracy:.2f}")
        return summary.interrupted

    return cli.run(parse_and_run, log)


if __name__ == "__main__":
    sys.exit(main())
