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


#: The most characters of a value an error message shows (:func:`shorten`).
SHOWN_CHARS = 120


def shorten(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how many were left out: what an error message shows
    of a value the user gave, so that a huge one (an expanded YAML alias, a long list) stays one short line.
    Containers are cut while they are formatted, so a huge value is never turned into a huge string first."""
    text = _bounded_repr(value, limit + 1)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... (cut at {limit} characters)"


def _bounded_repr(value: object, budget: int, depth: int = 0) -> str:
    """A repr of at most about ``budget`` characters: lists, tuples and dicts are walked item by item and stop
    once the budget is spent (their full repr can be gigabytes when YAML aliases share sub-lists)."""
    if isinstance(value, (str, bytes)):
        return repr(value[:budget])
    kind = type(value)
    if depth > 20 or kind not in (list, tuple, dict):
        return repr(value)[:budget]
    items = value.items() if kind is dict else value
    parts, used = [], 2
    for item in items:
        if used >= budget:
            parts.append("...")
            break
        if kind is dict:
            key = _bounded_repr(item[0], budget - used, depth + 1)
            text = f"{key}: {_bounded_repr(item[1], budget - used - len(key), depth + 1)}"
        else:
            text = _bounded_repr(item, budget - used, depth + 1)
        parts.append(text)
        used += len(text) + 2
    body = ", ".join(parts) + ("," if kind is tuple and len(parts) == 1 else "")
    return {list: "[{}]", tuple: "({})", dict: "{{{}}}"}[kind].format(body)


#: The longest error line the scripts print (:func:`one_line`): a net under every message.
MAX_LINE_CHARS = 2000


def one_line(message: object, limit: int = MAX_LINE_CHARS) -> str:
    """``str(message)`` as the one line a script prints: line breaks as spaces, and past ``limit`` characters
    the middle cut out (saying how much), so that the start (what failed) and the end (what to do) stay."""
    text = str(message).strip().replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    if len(text) <= limit:
        return text
    keep = (limit - 40) // 2
    return f"{text[:keep]} ... ({len(text) - 2 * keep:,} characters cut) ... {text[-keep:]}"
