"""The README's quick start is what CI runs."""

import os

from conftest import ROOT


def test_ci_runs_the_readmes_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = [line.strip() for line in readme.splitlines()
                if line.startswith("    python3 -m venv")]
    assert len(commands) == 2, "the quick start has exactly two commands"
    demo_command, test_command = commands
    assert demo_command.endswith(".venv/bin/python main.py")
    assert test_command.endswith("-m pytest")
    assert test_command in open(os.path.join(ROOT, ".ci", "run")).read()
