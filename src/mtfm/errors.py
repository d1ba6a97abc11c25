"""Errors shared across the package, and which errors are the user's to fix.

The ``mtfm`` command prints a user's error as one line naming what is wrong (exit status 2)
and anything else with its traceback as a bug (:func:`mtfm.cli.main`). The convention that
makes the difference: bad input raises a ``ValueError`` (the project's own subclasses:
:class:`mtfm.config.SchemaError`, :class:`mtfm.model.config.ModelConfigError`,
:class:`mtfm.train.config.TrainConfigError`, :class:`mtfm.data.validate.DataError`,
:class:`mtfm.data.store.CorruptDataError`, ...), a broken run directory raises
:class:`mtfm.train.checkpoint.CheckpointError`, and the file system raises ``OSError``
(missing file, permission, disk full, a directory locked by another process).
"""

from __future__ import annotations


class UnknownNameError(KeyError, ValueError):
    """A name the data does not have (a split, a scenario).

    A ``KeyError`` for code that looks names up, and a ``ValueError`` (bad input) for the
    command line, which prints it as a message. ``str`` is the message itself, without the
    quotes ``KeyError`` puts around it.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
