"""common.io: a failed write leaves the old file whole (a full disk is one line naming the file and errno); a
written file gets umask permissions without touching the umask; output paths are checked before the work;
paths print as one field."""
import errno
import os

import pytest

import common.io
from common.errors import InvalidValueError, OutputExistsError, ProjectIOError
from common.io import atomic_torch_save, atomic_write, check_output_file, printable_path


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_write_replaces_and_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "sub" / "f.txt", lambda tmp: open(tmp, "w").write("new"))
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "f.txt"
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o640


def test_torch_save_round_trip(tmp_path):
    import torch

    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["x"], torch.arange(3))


def test_atomic_write_never_touches_the_process_umask(tmp_path, monkeypatch):
    """Issue 19.11: atomic_write set the umask to 0 to read it, so files another thread created meanwhile got
    group/world write bits. It must get the mode without calling os.umask at all."""
    old = os.umask(0o027)
    try:
        def forbidden(mask: int) -> int:
            raise AssertionError(f"os.umask({mask:o}) called: the umask is process-wide")

        monkeypatch.setattr(os, "umask", forbidden)
        atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("new"))
        atomic_torch_save({"x": 1}, tmp_path / "x.pt")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "x.pt").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_is_one_line_naming_the_file_and_the_errno(tmp_path):
    """Issue 19.8: a full disk during a save was torch's 'unexpected pos' RuntimeError, naming no file and no
    errno. Whatever the writer raises, an OSError behind it becomes one ProjectIOError line; the old file stays."""
    path = tmp_path / "db.pt"
    path.write_text("old")

    def torch_like(tmp: str) -> None:  # what torch.save into a file object does on ENOSPC
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None

    for writer in (torch_like, lambda tmp: _raise(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))):
        with pytest.raises(ProjectIOError) as caught:
            atomic_write(path, writer)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message
        assert ("[Errno 28]" in message and "ENOSPC" in message) or "EDQUOT" in message
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["db.pt"]


def test_torch_save_into_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """The real path: torch.save streams into a file object on a device that is full (/dev/full answers every
    write with ENOSPC), and the error is one line naming the target, not torch's RuntimeError."""
    import torch

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        return real_open("/dev/full", mode, *args, **kwargs) if mode == "wb" else real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(common.io, "open", full_disk_open, raising=False)
    with pytest.raises(ProjectIOError, match=r"x\.pt: \[Errno 28\] No space left on device \(ENOSPC\)"):
        atomic_torch_save({"x": torch.zeros(1 << 16)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists() and os.listdir(tmp_path) == []


def _raise(exc: BaseException) -> None:
    raise exc


def test_output_checks_come_before_the_work(tmp_path):
    """Issue 19.3 and 19.15: an existing file, a folder, a name without a known ending are refused up front."""
    existing = tmp_path / "kept.png"
    existing.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="kept.png already exists: pass --overwrite"):
        check_output_file(existing, overwrite=False, suffixes=(".png",))
    assert check_output_file(existing, overwrite=True, suffixes=(".png",)) == existing
    with pytest.raises(InvalidValueError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True, suffixes=(".png",))
    with pytest.raises(InvalidValueError, match=r"must end in \.png or \.jpg"):
        check_output_file(tmp_path / "grid", overwrite=True, suffixes=(".png", ".jpg"))
    assert check_output_file(tmp_path / "new" / "deeper" / "g.PNG", overwrite=False, suffixes=(".png",))
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidValueError, match="is not a folder"):
        check_output_file(tmp_path / "file" / "g.png", overwrite=False, suffixes=(".png",))
    assert existing.read_bytes() == b"precious"


def test_printable_path_escapes_what_would_break_a_line_or_a_field():
    """Issue 19.4 and 19.14: a name is any bytes but '/' and NUL; printed, it stays one field of one line."""
    assert printable_path(os.fsdecode(b"/p/bad\xff\xfe.jpg")) == "/p/bad\\xff\\xfe.jpg"
    assert printable_path(b"/p/a\tb\nc\rd\\e\x01.jpg") == "/p/a\\tb\\nc\\rd\\\\e\\x01.jpg"
    assert printable_path("/p/café.jpg") == "/p/café.jpg"
    printable_path(os.fsdecode(b"\xff")).encode("ascii")  # nothing left that an ASCII terminal cannot print
