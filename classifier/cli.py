"""What every script shares: the errors a user can cause and their exit codes, logging, and a
quiet start for TensorFlow.

A script's main() hands its work to run(), which turns each of these errors into one line
on stderr and an exit code, never a traceback:

    2    UserError: unusable inputs or settings; OSError: a location that cannot be written
    3    TrainingDiverged: the loss became NaN or infinite
    4    WorkerLost: another worker of a multi-machine run stopped
    130  Ctrl-C
    143  SIGTERM (docker stop, Kubernetes, Slurm, cloud preemption): a stop like Ctrl-C
"""

import glob
import logging
import math
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass

INTERRUPTED = 130
TERMINATED = 143
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """A problem the user can fix (bad path, no images, missing model): reported in one line."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite, and TerminateOnNaN stopped the run."""


class WorkerLost(Exception):
    """Another worker of a multi-worker run stopped or cannot be reached."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as Ctrl-C stops, wherever the program is."""


EXIT_CODES = {UserError: 2, TrainingDiverged: 3, WorkerLost: 4}


def stop_code(interruption):
    """The exit code of a KeyboardInterrupt: 143 for SIGTERM, 130 for Ctrl-C."""
    return TERMINATED if isinstance(interruption, Terminated) else INTERRUPTED


def _terminate(signum, frame):
    raise Terminated()


@dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: from low to high (None: no bound), each end
    itself allowed unless open. why, if given, says why in the error message."""
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    why: str = None

    def allows(self, value):
        if isinstance(value, float) and math.isnan(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or
                           (value < self.high if self.high_open else value <= self.high))

    def __str__(self):
        if self.low_open and self.high_open:
            words = f"between {self.low} and {self.high}"
        else:
            ends = ([f"{'greater than' if self.low_open else 'at least'} {self.low}"]
                    if self.low is not None else [])
            if self.high is not None:
                ends.append(f"{'less than' if self.high_open else 'at most'} {self.high}")
            words = " and ".join(ends)
        return f"{words} ({self.why})" if self.why else words


def check_ranges(args, ranges):
    """Raise UserError, naming the flag, its value and the allowed range, for the first
    setting of args outside its range in ranges ({setting: Range}); None passes."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        if value is not None and not allowed.allows(value):
            raise UserError(f"--{name.replace('_', '-')} must be {allowed}, got {value}")


def setup_logging(verbose=False):
    """Log lines as 'LEVEL name: message'; debug lines, TensorFlow's Python INFO lines (from
    tf.distribute, mostly) included, only when verbose. Safe to call again once the flags
    are known."""
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.DEBUG if verbose else logging.WARNING)


def run(work, log, where="the output"):
    """work()'s exit code; the errors above become one line on log and their exit code, and
    SIGTERM stops work() as Ctrl-C does. where names what an OSError without a file name
    could not write."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return work()
    except tuple(EXIT_CODES) as error:
        log.error("%s", error)
        return EXIT_CODES[type(error)]
    except OSError as error:  # a full disk, or a folder that went away mid-run
        log.error("cannot write %s: %s", error.filename or where, error.strerror or error)
        return 2
    except KeyboardInterrupt as interruption:
        log.warning("interrupted")
        return stop_code(interruption)


# TensorFlow's C++ start-up writes to the file descriptor of stderr before it applies its own
# log level (TF_CPP_MIN_LOG_LEVEL): absl's notice about that, INFO lines, and on a machine
# without an NVIDIA driver a cuInit error line that only says there is no GPU.
_ABSL_NOTICE = re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\)")
_INFO_LINE = re.compile(rb"^I\d{4} ")
_NO_DRIVER_LINE = re.compile(rb"^E\d{4} .*failed call to cuInit")
_NEW_LINE_OF_LOG = re.compile(rb"^([IWEF]\d{4} |WARNING: )")


def start_tensorflow():
    """Import TensorFlow and list its GPUs with stderr held back, then pass on what it printed
    there, less the lines it would have hidden itself and, where there is no NVIDIA driver at
    all, the cuInit line that says so. A beginner reads an E-line as "broken"."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO chatter; warnings stay
    if "tensorflow" in sys.modules:
        return
    hide_info = os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() not in ("", "0")
    no_driver = not glob.glob("/dev/nvidia*")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            hiding = False
            for line in held:
                if _NEW_LINE_OF_LOG.match(line):  # else it goes on the line before it
                    hiding = bool(_ABSL_NOTICE.match(line)
                                  or (hide_info and _INFO_LINE.match(line))
                                  or (no_driver and _NO_DRIVER_LINE.match(line)))
                if not hiding:
                    os.write(2, line)
