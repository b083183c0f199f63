"""common/download.py against a local HTTP server on 127.0.0.1 (no network): the resumable plain-HTTP fetch, and
gdown's real code listing a Drive folder and downloading a file through the confirmation page, routed to the
local stand-in for Drive; Drive link parsing; one error kind per failure."""
import numpy as np
import pytest

from common.download import (
    DownloadError,
    InterruptedDownloadError,
    UnreachableError,
    drive_file_id,
    drive_folder_id,
    fetch,
    fetch_drive_file,
    list_drive_folder,
)
from tests.support.fake_http import closed_port, route_google_to

FOLDER = "1FoLdErAbCdEfGhIjKlMnOpQrStUvWx"
FILE_A = "1FiLeAaAbCdEfGhIjKlMnOpQrStUvWx"
FILE_B = "1FiLeBbAbCdEfGhIjKlMnOpQrStUvWx"


def _payload(n=200_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------------- plain HTTP


def test_fetch_resumes_part_with_a_range_request(tmp_path, http_server):
    data = _payload()
    http_server.files["/big.bin"] = data
    dest = tmp_path / "big.bin"
    (tmp_path / "big.bin.part").write_bytes(data[:70_001])
    fetch(f"{http_server.url}/big.bin", str(dest), progress=False)
    assert http_server.log == [("/big.bin", "bytes=70001-")]
    assert dest.read_bytes() == data and not (tmp_path / "big.bin.part").exists()


def test_fetch_restarts_when_range_is_ignored(tmp_path, http_server):
    data = _payload(seed=1)
    http_server.files["/f.bin"] = data
    http_server.honour_range = False
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes from some other file")
    fetch(f"{http_server.url}/f.bin", str(tmp_path / "f.bin"), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_fetch_part_already_complete_and_http_errors(tmp_path, http_server):
    data = _payload(1000)
    http_server.files["/done.bin"] = data
    (tmp_path / "done.bin.part").write_bytes(data)
    fetch(f"{http_server.url}/done.bin", str(tmp_path / "done.bin"), progress=False)  # 416 with full length
    assert (tmp_path / "done.bin").read_bytes() == data
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{http_server.url}/missing.bin", str(tmp_path / "missing.bin"), progress=False)


def test_fetch_resumes_a_transfer_cut_off_within_its_attempts(tmp_path, http_server):
    data = _payload(seed=2)
    http_server.files["/cut.bin"] = data
    http_server.cut_once = True
    with pytest.raises(InterruptedDownloadError, match="run again to resume"):
        fetch(f"{http_server.url}/cut.bin", str(tmp_path / "a.bin"), progress=False, timeout=20)
    assert (tmp_path / "a.bin.part").read_bytes() == data[: len(data) // 2]  # what came is kept
    http_server.cut_once, http_server.log[:] = True, []
    fetch(f"{http_server.url}/cut.bin", str(tmp_path / "b.bin"), progress=False, timeout=20, attempts=2)
    assert (tmp_path / "b.bin").read_bytes() == data
    assert http_server.log == [("/cut.bin", None), ("/cut.bin", f"bytes={len(data) // 2}-")]


def test_fetch_from_an_unreachable_server(tmp_path):
    port = closed_port()
    with pytest.raises(UnreachableError, match="offline?") as err:
        fetch(f"http://127.0.0.1:{port}/w.bin", str(tmp_path / "w.bin"), progress=False, attempts=3)
    assert err.value.host == f"127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------------- Google Drive


def test_drive_ids_from_the_links_drive_gives():
    fid = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    for url in (f"https://drive.google.com/file/d/{fid}/view?usp=sharing", f"https://drive.google.com/file/d/{fid}",
                f"https://drive.google.com/file/u/1/d/{fid}/view", f"https://drive.google.com/open?id={fid}",
                f"https://drive.google.com/uc?export=download&id={fid}", f"https://docs.google.com/uc?id={fid}",
                f"https://drive.usercontent.google.com/download?id={fid}&export=download&confirm=t"):
        assert drive_file_id(url) == fid and drive_folder_id(url) is None, url
    for url in (f"https://drive.google.com/drive/folders/{fid}?usp=sharing", f"https://drive.google.com/drive/u/0/"
                f"folders/{fid}", f"https://drive.google.com/folderview?id={fid}"):
        assert drive_folder_id(url) == fid and drive_file_id(url) is None, url
    for url in ("https://example.org/file/d/1AbCdEfGhIjKlMnOp/view", "https://drive.google.com/drive/folders",
                "https://drive.google.com/file/d/../view", "http://127.0.0.1:8000/w.pyth",
                "https://drive.google.com/drive/my-drive"):
        assert drive_file_id(url) is None and drive_folder_id(url) is None, url


def test_list_drive_folder_reads_the_folder_view(fake_drive):
    fake_drive.drive_files.update({FILE_A: ("CVPR2022_CVNet_R50.pyth", b"a"), FILE_B: ("notes & more.txt", b"b")})
    fake_drive.drive_folders[FOLDER] = ("CVNet", [FILE_A, FILE_B])
    assert list_drive_folder(FOLDER) == {"CVPR2022_CVNet_R50.pyth": FILE_A, "notes & more.txt": FILE_B}
    assert fake_drive.log == [("/embeddedfolderview", None)]  # one request, nothing downloaded
    with pytest.raises(DownloadError, match=f"listing the Google Drive folder {FOLDER[:-1]}y failed"):
        list_drive_folder(FOLDER[:-1] + "y")  # Drive answers 404


def test_fetch_drive_file_through_the_confirmation_page_resumed(tmp_path, fake_drive):
    data = _payload(1_500_000, seed=3)  # gdown reads 512 kB chunks: the cut comes after the first one
    fake_drive.drive_files[FILE_A] = ("w.pyth", data)
    fake_drive.cut_once = True
    dest = tmp_path / "sub" / "w.pyth"
    fetch_drive_file(FILE_A, str(dest), attempts=2, timeout=20, progress=False)
    assert dest.read_bytes() == data and sorted(p.name for p in dest.parent.iterdir()) == ["w.pyth"]
    # the confirmation page, the file cut off; then (gdown's resume) the page again, the file's first answer
    # (dropped unread) and the rest by a Range request from gdown's partial file
    assert fake_drive.log == [("/uc", None), ("/download", None), ("/uc", None), ("/download", None),
                         ("/download", f"bytes={512 * 1024}-")]


def test_fetch_drive_file_errors_and_partial_files_kept_per_id(tmp_path, fake_drive, monkeypatch):
    data_a, data_b = _payload(1_500_000, seed=4), _payload(700_000, seed=5)
    fake_drive.drive_files.update({FILE_A: ("w.pyth", data_a), FILE_B: ("w.pyth", data_b)})
    fake_drive.cut_once = True
    dest = tmp_path / "w.pyth"
    with pytest.raises(InterruptedDownloadError, match=f"download of Google Drive file {FILE_A} was interrupted"):
        fetch_drive_file(FILE_A, str(dest), attempts=1, timeout=20, progress=False)
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(f"w.pyth.drive-{FILE_A}") and partial.read_bytes() == data_a[: 512 * 1024]
    # another id for the same name starts from zero: the other id's bytes are never spliced in
    fetch_drive_file(FILE_B, str(dest), timeout=20, progress=False)
    assert dest.read_bytes() == data_b and partial.exists()
    with pytest.raises(DownloadError, match="Drive gave no download link") as err:
        fetch_drive_file(FOLDER, str(tmp_path / "c.pyth"), progress=False)  # no such file: Drive's error page
    assert not isinstance(err.value, InterruptedDownloadError) and not (tmp_path / "c.pyth").exists()
    route_google_to(monkeypatch, f"http://127.0.0.1:{closed_port()}")  # offline
    with pytest.raises(UnreachableError, match="cannot reach drive.google.com") as err:
        fetch_drive_file(FILE_A, str(tmp_path / "d.pyth"), attempts=3, progress=False)
    assert err.value.host == "drive.google.com"
    with pytest.raises(UnreachableError, match="listing the Google Drive folder"):
        list_drive_folder(FOLDER)
