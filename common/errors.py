"""The project's one error family: every error it raises on purpose derives from :class:`ProjectError`.

The scripts print a ProjectError as one line and exit 2 (``cli.run_reporting_errors``); anything else is a bug
and keeps its traceback. Each error also derives from the builtin type it refines (a bad value is a
``ValueError``, a missing file a ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class ProjectError(Exception):
    """An error the project raises on purpose, with a message that says what is wrong and what to do."""


class InvalidValueError(ProjectError, ValueError):
    """A value given to the project is not valid: an argument, a setting or the content of a file."""


class MissingFileError(ProjectError, FileNotFoundError):
    """A file or folder the work needs is not there; the message says where to get it."""


class OutputExistsError(ProjectError, FileExistsError):
    """An output is already there and was not to be replaced (an ``--overwrite`` flag says otherwise)."""


class MissingDependencyError(ProjectError, ImportError):
    """An optional package the chosen feature needs is not installed; the message says which."""


class ProjectRuntimeError(ProjectError, RuntimeError):
    """A run could not go on (a conflict, too many bad inputs, a remote service that failed)."""


class ProjectIOError(ProjectError, OSError):
    """A file could not be read or written (full disk, no permission, an unwritable format); the message names it."""
