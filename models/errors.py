"""The one error family for bad input.

Every error a user can cause (a recipe key, a data file, a weights file, a checkpoint, a command-line value)
derives from `InputError` and names the file, key or value in its message. Every entry point
(`trainer/main.py` and each `python -m` tool) turns an `InputError` into one line on stderr and exit code 2
(`EXIT_BAD_INPUT`); anything else is a programming error and stays a traceback.

It lives in `models/` because that package is the bottom of the import graph (`data/`, `heads/`, `evaluation/`
and `trainer/` may all import it, and it imports nothing of theirs).
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad input from the user; the message is one line naming the file, key or value."""
