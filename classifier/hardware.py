"""Choices made for the machine a run lands on: the numeric precision of the network, and
whether the images are held in memory or streamed from the cache."""

import contextlib
import os

import keras
import tensorflow as tf

# Keras dtype policies behind --precision.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# Datasets bigger than this share of the available memory are streamed from the cache.
MEMORY_SHARE = 0.25


def choose_precision(requested, gpu_capabilities, cpu_flags):
    """The Keras dtype policy for --precision: bfloat16 only where the hardware computes
    it natively (emulated, it is slower than float32), float16 on GPUs that have fast
    float16 but no bfloat16, float32 everywhere else."""
    if requested != "auto":
        return POLICIES[requested]
    if gpu_capabilities:
        oldest = min(gpu_capabilities)
        if oldest >= (8, 0):
            return POLICIES["bfloat16"]
        return POLICIES["float16"] if oldest >= (7, 0) else POLICIES["float32"]
    if {"avx512_bf16", "amx_bf16"} & set(cpu_flags):
        return POLICIES["bfloat16"]
    return POLICIES["float32"]


def gpu_capabilities():
    """Compute capability (major, minor) of each visible GPU."""
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        found.append(tuple(capability) if capability else (0, 0))
    return found


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


@contextlib.contextmanager
def dtype_policy(policy):
    """Layers built inside take policy; the previous global policy comes back after, for
    whatever the process builds next."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def choose_data_mode(requested, dataset_bytes, free_bytes):
    if requested != "auto":
        return requested
    return "stream" if dataset_bytes > MEMORY_SHARE * free_bytes else "memory"


def available_memory():
    """Bytes the system can still give without swapping (MemAvailable where Linux has it)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
