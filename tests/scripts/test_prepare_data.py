"""``prepare_data.py weights`` with no flag against a local stand-in for Google Drive and the R50 mirror on
127.0.0.1 (no network): the folder listed, the confirmation page, an interrupted transfer resumed, the strict load
of each file's depth, SHA256SUMS; and the one-line errors when offline, when a file is not the checkpoint, or when
it changed since it was recorded. Then ``synthetic --class-folder`` and ``revisitop``: the built-in landmarks as a
class folder, and that folder back in the revisitop layout."""
import hashlib

import numpy as np
import pytest

import models.weights as weights_module
from models.weights import CVNET_DRIVE_FOLDER_ID, CVNET_DRIVE_FOLDER_URL, OfficialWeights
from prepare_data import main
from tests.support.fake_http import closed_port, official_checkpoint, route_google_to

pytestmark = pytest.mark.usefixtures("one_thread")

R50_FILE, R101_FILE = "CVPR2022_CVNet_R50.pyth", "CVPR2022_CVNet_R101.pyth"
R50_ID = "1TNMrFY65ZMre9bWoUvLLKnIYv34h0pLB"  # the id the table records
R101_ID = "1RoNeOhOnEAbCdEfGhIjKlMnOpQrStU"  # made up: the fetcher finds it in the folder's listing


@pytest.fixture
def cvnet_drive(fake_drive, official_r50, official_r101):
    """The local Google Drive, holding the current folder with both files."""
    fake_drive.drive_files.update({R50_ID: (R50_FILE, official_r50), R101_ID: (R101_FILE, official_r101)})
    fake_drive.drive_folders[CVNET_DRIVE_FOLDER_ID] = ("CVNet", [R50_ID, R101_ID])
    return fake_drive


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_weights_without_flags_fetches_checks_and_records_both(tmp_path, cvnet_drive, official_r50, official_r101):
    cvnet_drive.cut_once = True  # R50's transfer breaks off half-way: resumed by gdown from its partial file
    root = tmp_path / "weights"
    assert main(["weights", "R50", "R101", "--root", str(root), "--timeout", "20", "--no-progress"]) == 0
    assert (root / R50_FILE).read_bytes() == official_r50 and (root / R101_FILE).read_bytes() == official_r101
    assert sorted(p.name for p in root.iterdir()) == sorted([R50_FILE, R101_FILE, "SHA256SUMS"])
    # R50 by its recorded id (the page, the cut transfer, the page again, the rest); R101 by the folder's listing
    paths = [path for path, _ in cvnet_drive.log]
    assert paths[:2] == ["/uc", "/download"] and paths.count("/embeddedfolderview") == 1
    assert ("/uc", None) == cvnet_drive.log[paths.index("/embeddedfolderview") + 1]
    assert (root / "SHA256SUMS").read_text() == (  # sha256sum -c format
        f"{hashlib.sha256(official_r101).hexdigest()}  {R101_FILE}\n"
        f"{hashlib.sha256(official_r50).hexdigest()}  {R50_FILE}\n")
    # a second run finds both files, checks them again and fetches nothing
    cvnet_drive.log.clear()
    assert main(["weights", "R50", "R101", "--root", str(root), "--no-progress"]) == 0
    assert cvnet_drive.log == []


def test_offline_names_the_folder_and_every_source_tried_in_one_line(tmp_path, monkeypatch, capsys):
    port = closed_port()
    route_google_to(monkeypatch, f"http://127.0.0.1:{port}")  # Drive refuses connections, as offline
    mirror = f"http://127.0.0.1:{port}/networks/{R50_FILE}"
    monkeypatch.setitem(weights_module.OFFICIAL_WEIGHTS, "R50", OfficialWeights(
        "R50", 50, R50_FILE, drive_id=R50_ID, mirrors=(mirror,)))
    root = tmp_path / "weights"
    assert main(["weights", "R50", "R101", "--root", str(root)]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("prepare_data.py weights: error: offline? could not fetch CVPR2022_CVNet_R50.pyth: tried ")
    assert f"Google Drive file {R50_ID} (cannot reach drive.google.com)" in err
    assert f"the Google Drive folder {CVNET_DRIVE_FOLDER_URL} (cannot reach drive.google.com)" in err
    assert f"{mirror} (cannot reach 127.0.0.1:{port})" in err
    assert f"could not fetch {R101_FILE}: tried the Google Drive folder {CVNET_DRIVE_FOLDER_URL}" in err
    assert f"download {R50_FILE} and {R101_FILE} from the Google Drive folder {CVNET_DRIVE_FOLDER_URL}" in err
    assert f"into {root}/ and run `python prepare_data.py weights R50 R101 --root {root}`" in err
    assert not root.exists() or not any(root.iterdir())


def test_a_file_that_is_not_the_checkpoint_is_rejected(tmp_path, http_server, official_r50, capsys):
    http_server.files.update({"/page.pyth": b"<html>sign in</html>" * 10, "/r50.pyth": official_r50})
    root = tmp_path / "weights"
    page = f"{http_server.url}/page.pyth"
    assert main(["weights", "R50", "--root", str(root), "--url", page, "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "not a loadable CVNet ResNet-50 checkpoint" in err and f"{R50_FILE}.rejected" in err
    assert not (root / R50_FILE).exists() and not (root / "SHA256SUMS").exists()
    # the R50 file fetched as R101 fails the strict load of depth 101
    r50_as_r101 = f"{http_server.url}/r50.pyth"
    assert main(["weights", "R101", "--root", str(root), "--url", r50_as_r101, "--no-progress"]) == 2
    assert "not a loadable CVNet ResNet-101 checkpoint" in _one_line_error(capsys)


def test_url_may_be_a_drive_folder_link(tmp_path, cvnet_drive, official_r101):
    root = tmp_path / "weights"
    link = f"https://drive.google.com/drive/folders/{CVNET_DRIVE_FOLDER_ID}?usp=sharing"
    assert main(["weights", "R101", "--root", str(root), "--url", link, "--no-progress"]) == 0
    assert (root / R101_FILE).read_bytes() == official_r101


def test_a_file_changed_since_it_was_recorded_is_refused(tmp_path, capsys, official_r50):
    root = tmp_path / "weights"
    root.mkdir()
    (root / R50_FILE).write_bytes(official_r50)  # put in place by hand: checked and recorded
    assert main(["weights", "R50", "--root", str(root)]) == 0
    (root / R50_FILE).write_bytes(official_checkpoint(50, fill=0.75))
    assert main(["weights", "R50", "--root", str(root)]) == 2
    err = _one_line_error(capsys)
    assert "recorded in SHA256SUMS when it was first checked" in err and "delete or replace it" in err


def test_url_names_one_file(tmp_path, capsys):
    assert main(["weights", "R50", "R101", "--root", str(tmp_path), "--url", "https://example.org/w.pyth"]) == 2
    assert "--url gives one file" in _one_line_error(capsys)
    assert main(["weights", "R50", "--root", str(tmp_path), "--url", "ftp://example.org/w.pyth"]) == 2
    assert "http(s)" in _one_line_error(capsys)


# --------------------------------------------------------------------------------------------------------------
# Class folders: the built-in landmarks as one, and one written in the revisitop layout
# --------------------------------------------------------------------------------------------------------------

TINY = ["--n-landmarks", "2", "--views-per-landmark", "3", "--n-distractors", "1", "--image-size", "96", "64",
        "--train-landmarks", "2", "--train-views-per-landmark", "2", "--no-progress"]


def test_synthetic_class_folder_then_revisitop_round_trip(tmp_path, capsys):
    """`synthetic --class-folder` writes the built-in landmarks as a class folder; `revisitop` writes that folder back
    in the revisitop layout, which datasets.revisited reads with the benchmark's own positives and junk."""
    from datasets.revisited import load_ground_truth

    classes = tmp_path / "classes"
    assert main(["synthetic", "--root", str(tmp_path / "data"), "--class-folder", str(classes), *TINY]) == 0
    assert sorted(p.name for p in (classes / "test").iterdir()) == ["gallery", "junk.txt", "query",
                                                                     "query_boxes.csv"]
    assert sorted(p.name for p in (classes / "training").iterdir()) == ["landmark_02", "landmark_03"]
    assert main(["revisitop", str(classes / "test"), "--root", str(tmp_path / "data"), "--name", "back"]) == 0
    synth = load_ground_truth(tmp_path / "data" / "synth" / "gnd_synth.pkl")
    back = load_ground_truth(tmp_path / "data" / "back" / "gnd_back.pkl")
    assert [q.removeprefix("query__").split("__")[-1] for q in back["qimlist"]] == synth["qimlist"]
    stem = [name.split("__")[-1] for name in back["imlist"]]
    for ours, theirs in zip(back["gnd"], synth["gnd"]):
        positives = np.concatenate([theirs["easy"], theirs["hard"]])
        assert sorted(stem[j] for j in ours["easy"]) == sorted(synth["imlist"][j] for j in positives)
        assert sorted(stem[j] for j in ours["junk"]) == sorted(synth["imlist"][j] for j in theirs["junk"])
        assert ours["bbx"].tolist() == theirs["bbx"].tolist() and ours["hard"].size == 0
    # the second time: refused without --overwrite, in one line
    capsys.readouterr()
    assert main(["revisitop", str(classes / "test"), "--root", str(tmp_path / "data"), "--name", "back"]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert main(["revisitop", str(tmp_path / "nowhere"), "--root", str(tmp_path / "data"), "--name", "x"]) == 2
    assert "nowhere" in _one_line_error(capsys)
