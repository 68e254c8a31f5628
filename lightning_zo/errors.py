"""Errors that mean "the input is wrong": reported as one line, without a traceback."""

from __future__ import annotations

import contextlib
import sys

from hydra.errors import InstantiationException


class UserError(Exception):
    pass


@contextlib.contextmanager
def user_errors():
    """Bad input ends the run with one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (UserError, InstantiationException, ValueError) as e:
        root = e
        while isinstance(root, InstantiationException) and root.__cause__ is not None:
            root = root.__cause__
        if not isinstance(root, (UserError, ValueError)):
            raise
        print(f"error: {root}", file=sys.stderr)
        sys.exit(2)
