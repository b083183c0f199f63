"""models/weights.py: the official files' sources, the fetcher's order of sources and its checks (a strict load of
the right depth, the sha256 recorded on first use and checked on every later one), against a local stand-in for
Google Drive and the mirror (no network)."""
import hashlib

import pytest
import torch

from models import CVNetRerank, load_official_checkpoint
from models.checkpoint import read_checkpoint
from models.weights import (
    AMES_NETWORKS_URL,
    CVNET_DRIVE_FOLDER_ID,
    CVNET_DRIVE_FOLDER_URL,
    OFFICIAL_WEIGHTS,
    OFFICIAL_WEIGHTS_HINT,
    OfficialWeights,
    Source,
    WeightsError,
    check_recorded_sha256,
    fetch_official_weights,
    read_sha256sums,
    update_sha256sums,
    weight_sources,
)
from tests.support.fake_http import closed_port, official_checkpoint, route_google_to

pytestmark = pytest.mark.usefixtures("one_thread")

R50_FILE = "CVPR2022_CVNet_R50.pyth"
FOLDER = "1FoLdErAbCdEfGhIjKlMnOpQrStUvWx"
WRONG_ID = "1WrOnGgAbCdEfGhIjKlMnOpQrStUvWx"
R50_ID = "1RfIfTyAbCdEfGhIjKlMnOpQrStUvWx"


def strict_load(path: str, depth: int) -> None:
    """The check the fetcher is given: a strict load into CVNet-Rerank of ``depth`` (its layers to s3 tell R50 from
    R101); built on the meta device first, so no time goes into initialising weights that are overwritten."""
    with torch.device("meta"):
        model = CVNetRerank(depth=depth)
    load_official_checkpoint(model.to_empty(device="cpu"), path)


def test_the_table_points_at_the_current_folder():
    assert CVNET_DRIVE_FOLDER_URL == "https://drive.google.com/drive/folders/1gMbZ8JlTyPlH2-6HW5NHRe58LmKfJybx"
    assert {k: (w.depth, w.filename) for k, w in OFFICIAL_WEIGHTS.items()} == {
        "R50": (50, R50_FILE), "R101": (101, "CVPR2022_CVNet_R101.pyth")}
    r50, r101 = OFFICIAL_WEIGHTS["R50"], OFFICIAL_WEIGHTS["R101"]
    assert weight_sources(r50) == [Source("drive_file", "1TNMrFY65ZMre9bWoUvLLKnIYv34h0pLB"),
                                   Source("drive_folder", CVNET_DRIVE_FOLDER_ID),
                                   Source("http", AMES_NETWORKS_URL + R50_FILE)]
    assert weight_sources(r101) == [Source("drive_folder", CVNET_DRIVE_FOLDER_ID)]  # R101: by name in the listing
    assert str(weight_sources(r101)[0]) == f"the Google Drive folder {CVNET_DRIVE_FOLDER_URL}"
    assert "`python prepare_data.py weights R50 R101`" in OFFICIAL_WEIGHTS_HINT


def test_a_url_is_the_only_source():
    r50 = OFFICIAL_WEIGHTS["R50"]
    fid = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    assert weight_sources(r50, f"https://drive.google.com/drive/folders/{fid}?usp=sharing") == [
        Source("drive_folder", fid)]
    assert weight_sources(r50, f"https://drive.google.com/file/d/{fid}/view?usp=sharing") == [
        Source("drive_file", fid)]
    assert weight_sources(r50, "https://example.org/w.pyth") == [Source("http", "https://example.org/w.pyth")]
    with pytest.raises(WeightsError, match="http"):
        weight_sources(r50, "ftp://example.org/w.pyth")
    with pytest.raises(WeightsError, match="neither a file nor a folder.*CVPR2022_CVNet_R50.pyth"):
        weight_sources(r50, "https://drive.google.com/drive/my-drive")


def test_sha256sums_are_merged_in_sha256sum_format(tmp_path, caplog):
    path = tmp_path / "SHA256SUMS"
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    path.write_text(f"{a}  {R50_FILE}\n{b} *other.bin\nnot a line\n")
    assert read_sha256sums(path) == {R50_FILE: a, "other.bin": b}
    update_sha256sums(path, {"CVPR2022_CVNet_R101.pyth": c, R50_FILE: c})
    assert path.read_text() == (f"{c}  CVPR2022_CVNet_R101.pyth\n{c}  {R50_FILE}\n{b}  other.bin\n")
    assert "changed since it was recorded" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["SHA256SUMS"]  # written through a temporary file, renamed


def test_an_r101_file_offered_as_r50_is_refused_and_the_folder_is_next(tmp_path, fake_drive, official_r50,
                                                                       official_r101):
    fake_drive.drive_files.update({WRONG_ID: (R50_FILE, official_r101), R50_ID: (R50_FILE, official_r50)})
    fake_drive.drive_folders[FOLDER] = ("CVNet", [R50_ID])
    table = {"R50": OfficialWeights("R50", 50, R50_FILE, drive_id=WRONG_ID)}
    sums = fetch_official_weights(["R50"], root=tmp_path, folder_id=FOLDER, table=table, verify=strict_load,
                                  progress=False)
    digest = hashlib.sha256(official_r50).hexdigest()
    assert sums == {R50_FILE: digest} and (tmp_path / R50_FILE).read_bytes() == official_r50
    assert (tmp_path / f"{R50_FILE}.rejected").read_bytes() == official_r101  # kept for a look, out of the way
    assert read_sha256sums(tmp_path / "SHA256SUMS") == {R50_FILE: digest}


def test_the_mirror_when_drive_cannot_be_reached(tmp_path, http_server, monkeypatch, official_r50):
    route_google_to(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    http_server.files["/networks/" + R50_FILE] = official_r50
    table = {"R50": OfficialWeights("R50", 50, R50_FILE, drive_id=WRONG_ID,
                                    mirrors=(f"{http_server.url}/networks/{R50_FILE}",))}
    fetch_official_weights(["R50"], root=tmp_path, folder_id=FOLDER, table=table, verify=strict_load,
                           progress=False)
    assert (tmp_path / R50_FILE).read_bytes() == official_r50 and http_server.log == [("/networks/" + R50_FILE, None)]


def test_every_source_failing_is_one_line_saying_what_each_said(tmp_path, fake_drive, official_r101):
    fake_drive.drive_files.update({WRONG_ID: (R50_FILE, official_r101), R50_ID: ("notes.txt", b"x")})
    fake_drive.drive_folders[FOLDER] = ("CVNet", [R50_ID])
    table = {"R50": OfficialWeights("R50", 50, R50_FILE, drive_id=WRONG_ID)}
    with pytest.raises(WeightsError) as err:
        fetch_official_weights(["R50"], root=tmp_path / "w", folder_id=FOLDER, table=table, verify=strict_load,
                               progress=False)
    message = str(err.value)
    assert "\n" not in message and not message.startswith("offline?")  # Drive answered
    assert f"Google Drive file {WRONG_ID} (gave a file that is not a loadable CVNet ResNet-50 checkpoint" in message
    assert f"/drive/folders/{FOLDER} (it lists no {R50_FILE} (it holds: notes.txt))" in message
    assert f"into {tmp_path / 'w'}/ and run `python prepare_data.py weights R50 --root {tmp_path / 'w'}`" in message
    assert not (tmp_path / "w" / R50_FILE).exists() and not (tmp_path / "w" / "SHA256SUMS").exists()


def test_the_recorded_sha256_is_checked_on_every_later_use(tmp_path, official_r50):
    dest = tmp_path / R50_FILE
    dest.write_bytes(official_r50)  # put in place by hand: checked, then recorded (trust on first use)
    assert fetch_official_weights(["R50"], root=tmp_path, verify=strict_load) == {
        R50_FILE: hashlib.sha256(official_r50).hexdigest()}
    check_recorded_sha256(dest)
    read_checkpoint(dest)
    dest.write_bytes(official_checkpoint(50, fill=0.75))  # another file, as loadable, under the same name
    with pytest.raises(WeightsError, match="recorded .* when it was first checked") as err:
        fetch_official_weights(["R50"], root=tmp_path, verify=strict_load)
    assert "\n" not in str(err.value)
    for use in (check_recorded_sha256, read_checkpoint, lambda p: strict_load(p, 50)):
        with pytest.raises(WeightsError, match=r"python prepare_data.py weights R50 --root .*delete its line"):
            use(dest)
    (tmp_path / "SHA256SUMS").write_text("")  # the way out the message gives: accept this file
    read_checkpoint(dest)
