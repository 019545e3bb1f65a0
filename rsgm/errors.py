"""The one exception type for mistakes a user can fix.

Raise :class:`RSGMError` (or a subclass) with a one-line message that names the problem
and the fix, e.g. ``RSGMError("checkpoint runs/x/last.ckpt not found; train first with
rsgm fit --config configs/dm_digits.yaml")``. The ``rsgm`` command prints the message as
one line (``rsgm: <message>``) and exits with status 1; a traceback is shown only with
``--debug``. Anything else that escapes is a bug in rsgm and keeps its traceback.

:class:`MissingFileError` and :class:`BadValueError` are also a ``FileNotFoundError`` and a
``ValueError``, so code (and tests) that catch the built-in types keep working.
"""

from __future__ import annotations


class RSGMError(Exception):
    """A user-fixable problem (bad file, missing weights, wrong config value)."""

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages are folded so the CLI output stays one line.
        super().__init__(" ".join(str(message).split()))


class MissingFileError(RSGMError, FileNotFoundError):
    """A file or folder the user has to provide (data, weights, a trained target) is missing."""


class BadValueError(RSGMError, ValueError):
    """A config value that cannot work (e.g. data of the wrong shape for the model)."""
