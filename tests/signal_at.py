"""Runs train.py's main in this process and sends the process a signal the first time a
given function is called: a Ctrl-C or SIGTERM at that very moment, for tests/test_safety.py.

    python tests/signal_at.py MODULE:FUNCTION SIGNAL -- FLAGS

MODULE:FUNCTION is looked up and replaced in MODULE (classifier.reports:save_confusion_matrix,
os:pwrite); SIGNAL is a name (SIGTERM, SIGINT); FLAGS are train.py's.
"""

import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def main():
    split = sys.argv.index("--")
    where, name = sys.argv[1:split]
    module_name, function_name = where.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, function_name)
    sent = []

    def signalling(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), getattr(signal, name))
        return real(*args, **kwargs)

    setattr(module, function_name, signalling)
    return train.main(sys.argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
