"""common.io: a failed write leaves the old file whole; a written file gets umask permissions."""
import os

import pytest

from common.io import atomic_torch_save, atomic_write


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
