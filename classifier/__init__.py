"""The parts that train.py, predict.py, export.py and main.py stand on, one job per module.

Importing the package starts TensorFlow first, through cli.start_tensorflow, so that its
start-up lines are sorted out whichever module a script happens to import first.
"""

from classifier import cli

cli.start_tensorflow()
