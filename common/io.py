"""Crash-safe file writes shared by checkpoints, feature caches, vector databases and training state, and the
checks an output path gets before the work that fills it."""
from __future__ import annotations

import errno as errno_names
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import InvalidValueError, OutputExistsError, ProjectError, ProjectIOError

_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkstemp's alphabet: what orphan finders match


def _create_temporary(directory: Path, name: str) -> str:
    """A new empty file ``.<name>.<8 random characters>.tmp`` in ``directory``, created with mode 0o666 so that
    the kernel applies the process umask (the permissions a plain ``open(path, "w")`` gives), without reading
    or changing the umask (``os.umask`` is process-wide: another thread would create files meanwhile)."""
    for _ in range(100):
        token = "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))
        tmp = os.path.join(directory, f".{name}.{token}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno_names.EEXIST, "no free temporary name", os.path.join(directory, f".{name}.*.tmp"))


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc`` (itself, its cause or its context), if any: torch.save into a file
    object reports a full disk as a RuntimeError whose context is the OSError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def io_error(path: str | os.PathLike, exc: OSError, *, action: str = "write") -> ProjectIOError:
    """One line naming the file and the errno: ``could not write PATH: [Errno 28] No space left on device
    (ENOSPC)``."""
    name = errno_names.errorcode.get(exc.errno, "")
    err = ProjectIOError(f"could not {action} {os.fsdecode(path)}: [Errno {exc.errno}] {exc.strerror or exc}"
                         f"{f' ({name})' if name else ''}")
    err.errno = exc.errno  # (set afterwards: OSError's two-argument form would prefix "[Errno N]" once more)
    return err


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable_path(path: str | bytes | os.PathLike) -> str:
    """A path as one printable field: bytes that are not UTF-8 as ``\\xNN``, a backslash, tab, newline, carriage
    return or other control character as its escape, so that a name never breaks a line or a tab-separated
    record and can always be printed (a file name is any bytes but "/" and NUL)."""
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A reader (or a crash) sees the old file or the whole new one, never a partial write. The file gets the
    permissions a plain ``open(path, "w")`` would give. A failed write leaves the old file and no temporary;
    an operating-system error (a full disk, no permission) becomes :class:`common.errors.ProjectIOError`, one
    line naming ``path`` and the errno.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path.parent, path.name)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = None if isinstance(exc, ProjectError) else os_error_in(exc)
        if cause is not None:
            raise io_error(path, cause) from exc
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write` (torch is imported here, not at module import). Written into
    a file object, so that a full disk surfaces as the OSError it is (a path gives torch's bare RuntimeError)."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def check_output_file(path: str | os.PathLike, *, overwrite: bool, what: str = "output",
                      suffixes: tuple[str, ...] | None = None, flag: str = "--overwrite") -> Path:
    """Check, before the work that fills it, that ``path`` can be written: not an existing file unless
    ``overwrite`` (:class:`OutputExistsError`), not a folder, a name ending in one of ``suffixes`` (any case), and
    a folder to write it in (:class:`InvalidValueError`)."""
    path = Path(path)
    shown = os.fsdecode(path)
    if path.is_dir():
        raise InvalidValueError(f"the {what} {shown} is a folder: give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        endings = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)
        raise InvalidValueError(f"the {what} {shown} must end in {endings}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"the {what} {shown} already exists: pass {flag} to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidValueError(f"cannot write the {what} {shown}: {os.fsdecode(parent)} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ProjectIOError(f"cannot write the {what} {shown}: no permission to write in {os.fsdecode(parent)}")
    return path


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read ``block`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
