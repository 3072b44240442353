"""Training on several machines, under TensorFlow's MultiWorkerMirroredStrategy, which
Keras 3's fit cannot drive (it fails converting PerReplica values: keras-team/keras#20585).
For those, fit() runs the epochs the way Keras's fit does: the same callbacks, through
keras.callbacks.CallbackList, get the same logs, reduced over all the workers, so every
worker takes the same decisions (lowering the learning rate, stopping early or on NaN) at the
same step.

Every worker runs the same program on its own copy of the data and builds the same global
batches from the seed; replica r of R decodes and trains on part r of each
(pipelines.shard_part), so the global batch, the steps per epoch and the ImageDataGenerator
transform of each image are those of one process. Gradients are averaged over the whole
global batch before every update, so the workers keep identical weights. The chief (worker 0) writes the run's files;
its backup is the run's state, which the others take over when a run resumes. A worker that
stops makes TensorFlow abort the collective operations of the others (its coordination
service notices the missing heartbeats), which then stop with WorkerLost.
"""

import contextlib
import gc
import logging
import multiprocessing.pool
import shutil
import signal
import tempfile

import keras
import numpy as np
import tensorflow as tf

from classifier.cli import Terminated, UserError, WorkerLost
from classifier.distributed import is_chief

log = logging.getLogger("distributed")


def fit(strategy, model, training, steps_per_epoch, validation, epochs, first_epoch,
        class_weight, callbacks, verbose):
    """Keras's model.fit(training batches, steps_per_epoch, validation_data, epochs,
    initial_epoch=first_epoch, class_weight, callbacks, verbose) for a
    MultiWorkerMirroredStrategy, from first_epoch on (after a resume: the chief's).

    training(first_epoch, shard) and validation(shard) give shard's part of each global batch
    (pipelines.shard_part). model is compiled outside the strategy's scope (see
    distributed.model_scope); a copy in the scope trains, and model gets its weights and
    optimizer state back at the end, also after an interruption. The chief's callbacks
    restore a backup; every worker then takes the chief's weights, optimizer state, first
    epoch and ReduceLROnPlateau patience count.
    """
    try:
        with strategy.scope():
            twin = keras.models.clone_model(model)
            twin.compile_from_config(model.get_compile_config())
        model.optimizer.build(model.trainable_variables)
        copy_state(model, twin)
        try:
            with stop_together_on_sigterm(strategy) as check_sigterm:
                _fit(strategy, twin, training, steps_per_epoch, validation, epochs,
                     first_epoch, class_weight, callbacks, verbose, check_sigterm)
        finally:
            copy_state(twin, model)
    except tf.errors.UnavailableError as error:
        log.debug("%s", error)
        raise WorkerLost(
            "lost contact with another worker, so this one stops too. Start all the workers "
            "again with the same flags: they resume after the last epoch the chief backed "
            "up") from None
    finally:
        stop_thread_pools()


def _terminate():
    raise Terminated()


@contextlib.contextmanager
def stop_together_on_sigterm(strategy):
    """Yield a check to call after every step, which raises Terminated on every worker, at
    the same step, once any of them has received SIGTERM: the whole run then stops as Ctrl-C
    stops one process. TensorFlow's PreemptionCheckpointHandler carries the news between the
    workers; it saves nothing itself here, the chief's backup is the run's state."""
    previous = signal.getsignal(signal.SIGTERM)
    folder = tempfile.mkdtemp(prefix="preemption-")
    try:
        handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, tf.train.Checkpoint(), checkpoint_dir=folder,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=_terminate, save_fn=lambda *args, **kwargs: None))
        yield handler.save_checkpoint_if_preempted
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder, ignore_errors=True)


def stop_thread_pools():
    """TensorFlow runs each eager all-reduce in a multiprocessing ThreadPool, and leaves the
    pool running when the all-reduce fails (a worker lost, Ctrl-C); at exit, Python would
    then print a traceback from the pool's __del__. Stop such pools while the process can."""
    for thing in gc.get_objects():
        if isinstance(thing, multiprocessing.pool.ThreadPool):
            thing.terminate()


def copy_state(source, target):
    target.set_weights(source.get_weights())
    for copy, value in zip(target.optimizer.variables, source.optimizer.variables):
        copy.assign(value)


def _fit(strategy, model, training_batches, steps, validation_batches, epochs, first_epoch,
         class_weight, callbacks, verbose, check_sigterm):
    callbacks = keras.callbacks.CallbackList(callbacks, add_progbar=verbose != 0,
                                             verbose=verbose, epochs=epochs, steps=steps,
                                             model=model)
    validation_steps = int(validation_batches((0, 1)).cardinality())
    check_agreement(strategy, {"steps per epoch": steps, "validation batches": validation_steps,
                               "epochs": epochs, "parameters": model.count_params()})
    model.stop_training = False
    callbacks.on_train_begin()  # the chief's BackupAndRestore loads its backup
    state = model.weights + model.optimizer.variables
    *values, chief_epoch = from_chief(strategy, [v.numpy() for v in state] + [first_epoch])
    for variable, value in zip(state, values):
        variable.assign(value)
    first_epoch = int(chief_epoch)
    if first_epoch and not is_chief(strategy):
        log.info("resuming after epoch %d, from the chief's backup", first_epoch)
    train_step, test_step = step_functions(strategy, model, class_weight)
    training = iter(distribute(strategy, lambda shard: training_batches(first_epoch, shard)))
    validation = distribute(strategy, validation_batches)
    epoch_logs = None
    for epoch in range(first_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        if epoch == first_epoch:
            share_plateau_counts(strategy, callbacks)
        for step in range(steps):
            callbacks.on_train_batch_begin(step)
            logs = train_step(training)
            callbacks.on_train_batch_end(step, logs)
            check_sigterm()
            if model.stop_training:
                break
        epoch_logs = as_floats(model.get_metrics_result())
        model.reset_metrics()
        callbacks.on_test_begin()
        for step, batch in enumerate(validation):
            callbacks.on_test_batch_begin(step)
            logs = test_step(batch)
            callbacks.on_test_batch_end(step, logs)
        validation_logs = as_floats(model.get_metrics_result())
        callbacks.on_test_end(validation_logs)
        epoch_logs.update({f"val_{name}": value for name, value in validation_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    callbacks.on_train_end(epoch_logs)


def step_functions(strategy, model, class_weight):
    """One training step and one evaluation step, as tf.functions that run on every replica
    and return the model's metrics over all of them, as fit's logs have them."""
    # A Loss object (label smoothing) reduces over the batch; its call() gives one per image.
    per_example_loss = (model.loss.call if isinstance(model.loss, keras.losses.Loss)
                        else keras.losses.get(model.loss))
    loss_tracker = next(metric for metric in model.metrics if metric.name == "loss")
    # Keras's fit turns class weights into a weight per example by the target's class.
    weights = None if not class_weight else tf.constant(
        [class_weight.get(index, 1.0) for index in range(max(class_weight) + 1)], tf.float32)

    def example_weights(y, present):
        # present is 0 for the stand-in image of a replica that has no part of a short batch
        # (pipelines._sharded): it must count for nothing.
        return present if weights is None else present * tf.gather(weights, tf.argmax(y, -1))

    def train_replica(x, y, present):
        sample_weight = example_weights(y, present)
        # The last batch of an epoch is smaller, and may split unevenly between replicas:
        # averaging over the true global batch gives the gradient of one process.
        context = tf.distribute.get_replica_context()
        global_batch = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                          tf.cast(tf.reduce_sum(present), tf.int32))
        with tf.GradientTape() as tape:
            predictions = model(x, training=True)
            losses = per_example_loss(y, predictions) * sample_weight
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch)
            scaled = model.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        # Keras sums the replicas' gradients here, across the workers.
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        loss_tracker.update_state(losses, sample_weight=present)
        model.compute_metrics(x, y, predictions, sample_weight=sample_weight)

    def test_replica(x, y, present):
        predictions = model(x, training=False)
        loss_tracker.update_state(per_example_loss(y, predictions), sample_weight=present)
        model.compute_metrics(x, y, predictions, sample_weight=present)

    @tf.function
    def train_step(iterator):
        strategy.run(train_replica, args=next(iterator))
        return model.get_metrics_result()  # read outside the replicas: summed over them

    @tf.function
    def test_step(batch):
        strategy.run(test_replica, args=batch)
        return model.get_metrics_result()

    return train_step, test_step


def distribute(strategy, make_batches):
    """A distributed dataset in which replica r gets part r of every global batch:
    make_batches(shard) gives one part."""
    def dataset_for_worker(context):
        replicas = strategy.num_replicas_in_sync
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        parts = [make_batches((first + replica, replicas)) for replica in range(local)]
        # This worker's replicas take the parts of each global batch in turn.
        return tf.data.Dataset.choose_from_datasets(parts, tf.data.Dataset.range(local).repeat())

    return strategy.distribute_datasets_from_function(dataset_for_worker)


def from_chief(strategy, values):
    """values (NumPy arrays) as the chief has them, on every worker."""
    return sum_over_replicas(strategy, values, chief_only=True)


def sum_over_replicas(strategy, values, chief_only=False):
    """The sums of values (NumPy arrays) over all the replicas, or only the chief's values
    when chief_only: then all but the chief's first replica add zeros."""
    @tf.function
    def reduce(values):
        def replica():
            context = tf.distribute.get_replica_context()
            keep = not chief_only or context.replica_id_in_sync_group == 0
            # One by one: Keras's optimizer counts its steps in int64, the rest is float32.
            return [context.all_reduce(tf.distribute.ReduceOp.SUM,
                                       tf.where(keep, value, tf.zeros_like(value)))
                    for value in values]
        return strategy.run(replica)

    sums = reduce([tf.constant(value, dtype=np.asarray(value).dtype) for value in values])
    return [strategy.experimental_local_results(value)[0].numpy() for value in sums]


def check_agreement(strategy, counts):
    """Stop every worker, not only the odd one, when they would run different numbers of
    steps: the others would wait for it forever. The replicas' values are all equal exactly
    when the sum of their squares is the square of their sum over their number, and every
    worker gets the same sums, hence the same verdict."""
    mine = np.array(list(counts.values()), np.int64)
    total, squares = sum_over_replicas(strategy, [mine, mine * mine])
    replicas = strategy.num_replicas_in_sync
    if np.any(squares * replicas != total * total):
        differ = [name for name, value, sum_ in zip(counts, mine, total)
                  if value * replicas != sum_]
        raise UserError(
            f"the workers disagree on {'the ' if differ else 'one of: '}"
            f"{', '.join(differ or counts)}: give every worker the same flags and images")


def share_plateau_counts(strategy, callbacks):
    """ReduceLROnPlateau's patience count, which the chief restored from its backup: every
    worker must lower the learning rate when the chief does."""
    for callback in callbacks.callbacks:
        if isinstance(callback, keras.callbacks.ReduceLROnPlateau):
            wait, cooldown, best = from_chief(strategy, [np.array(
                [callback.wait, callback.cooldown_counter, callback.best], np.float64)])[0]
            callback.wait, callback.cooldown_counter, callback.best = int(wait), int(cooldown), best


def as_floats(logs):
    return {name: float(value) for name, value in logs.items()}
