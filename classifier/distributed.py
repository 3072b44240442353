"""Which tf.distribute strategy a run trains under, and what that means for its folders and
where its model is built.

One device, and one machine with several GPUs (MirroredStrategy), train with Keras's
model.fit (train.py). Several machines train under MultiWorkerMirroredStrategy with the loop
of multi_worker.py. The chief (worker 0) writes the run's files; the other workers write
theirs into private folders, removed at the end.
"""

import atexit
import contextlib
import logging
import os
import shutil
import tempfile

import tensorflow as tf

from classifier.cli import UserError

log = logging.getLogger("distributed")

STRATEGIES = ("auto", "single", "mirrored", "multi-worker")

def choose_strategy(name, devices, worker_addresses, worker_index):
    """The tf.distribute strategy for the flags: --strategy (one of STRATEGIES), --devices
    (comma-separated, for mirrored), --worker-addresses (comma-separated host:port) and
    --worker-index. auto picks multi-worker when TF_CONFIG or --worker-addresses describe a
    cluster, mirrored when --devices is given or more than one GPU is visible, else single.

    A multi-worker strategy waits here until every worker has started; it must be created
    before TensorFlow runs anything else in the process.
    """
    cluster = cluster_from_flags(worker_addresses, worker_index)
    if name == "auto":
        if cluster or "TF_CONFIG" in os.environ:
            name = "multi-worker"
        elif devices or len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "single"
    if name == "single":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        try:
            strategy = tf.distribute.MirroredStrategy(devices.split(",") if devices else None)
        except (ValueError, RuntimeError) as error:
            raise UserError(f"cannot mirror over --devices {devices}: {error}") from None
        log.info("mirrored over %d devices: %s", strategy.num_replicas_in_sync,
                 ", ".join(strategy.extended.worker_devices))
        return strategy
    if devices:
        raise UserError("--devices is for --strategy mirrored; a multi-worker run uses "
                        "every GPU a worker sees (limit them with CUDA_VISIBLE_DEVICES)")
    if not cluster and "TF_CONFIG" not in os.environ:
        raise UserError("a multi-worker run needs TF_CONFIG, or --worker-addresses and "
                        "--worker-index")
    try:
        cluster = cluster or tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = cluster.cluster_spec()
        log.info("%s %d, one of %d: waiting for all of them to start", cluster.task_type,
                 cluster.task_id, sum(len(spec.job_tasks(job)) for job in spec.jobs))
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot use the cluster in TF_CONFIG: {error}") from None


def cluster_from_flags(worker_addresses, worker_index):
    """The cluster --worker-addresses and --worker-index describe, or None without them."""
    if not worker_addresses:
        if worker_index is not None:
            raise UserError("--worker-index goes with --worker-addresses")
        return None
    if "TF_CONFIG" in os.environ:
        raise UserError("TF_CONFIG is set and so is --worker-addresses: use one of them")
    addresses = worker_addresses.split(",")
    if worker_index is None or not 0 <= worker_index < len(addresses):
        raise UserError(f"--worker-index must be this worker's place in "
                        f"--worker-addresses, 0 to {len(addresses) - 1}")
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": addresses}), task_type="worker", task_id=worker_index,
        rpc_layer="grpc")


def kind(strategy):
    """The strategy's name in STRATEGIES: single, mirrored or multi-worker."""
    if is_multi_worker(strategy):
        return "multi-worker"
    return "mirrored" if strategy.num_replicas_in_sync > 1 else "single"


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    return strategy.extended.should_checkpoint


def folders(strategy, output, logs):
    """Where this process writes the run's files and TensorBoard events: output and logs,
    except on a multi-worker run's workers other than the chief (private_folder)."""
    if is_chief(strategy):
        return output, logs
    private = private_folder(strategy)
    return private, os.path.join(private, "logs")


def private_folder(strategy):
    """A folder for what a worker other than the chief writes (its copy of the model,
    reports, checkpoints, backup, TensorBoard events), as Keras advises for multi-worker
    runs: removed when the process ends, so only the chief's files remain."""
    worker = strategy.cluster_resolver.task_id
    folder = tempfile.mkdtemp(prefix=f"worker-{worker}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    log.info("worker %d: the chief writes the run's files; this worker's copies go to %s, "
             "removed at the end", worker, folder)
    return folder


def model_scope(strategy):
    """Where to build and compile the model: in the strategy's scope when Keras's fit trains
    it; outside it for a multi-worker run, whose fit() below trains a copy, so that the model
    the caller saves and evaluates afterwards belongs to this worker alone (Keras would
    otherwise run its predict as a collective with the other workers)."""
    return contextlib.nullcontext() if is_multi_worker(strategy) else strategy.scope()
