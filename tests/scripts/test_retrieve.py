"""`python retrieve.py build|query` through main([...]) on a temp folder of generated images: the printed
ranking parsed, the result grid, the three back-ends (Pinecone through the real SDK against the local test
server), the user errors (empty folder, unreadable image named, existing index, bad box, missing or unfit weights,
a failed Pinecone write) as one line without traceback, and a --help that answers without importing torch."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers.retrieval.retriever import Hit, Retriever
from helpers.retrieval.tiles import query_tiles
from helpers.visualize import ranking_grid, score_decimals
from retrieve import format_hits, main, parse_bbox
from tests.support.pinecone_server import FakePinecone

REPO = Path(__file__).resolve().parents[2]

# nested folders, mixed and upper-case extensions; notes.txt must be ignored
NAMES = ["img0.png", "sub/img1.jpg", "sub/deeper/img2.PNG"]


def _image(seed: int, h: int = 96, w: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("photos")
    files = []
    for i, name in enumerate(NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), _image(i, 96, 96 + 16 * i))
        files.append(path.resolve())
    (root / "notes.txt").write_text("not an image")
    return root, files


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("index") / "idx"
    assert main(["build", "--images", str(folder[0]), "--index", str(index), "--device", "cpu", "--quiet"]) == 0
    return index


def _query(capsys, index: Path, image: Path, *extra: str) -> list[tuple[int, float, str]]:
    capsys.readouterr()
    rc = main(["query", "--index", str(index), "--image", str(image), "--device", "cpu", "--quiet", *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = []
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        rank, score, path = line.split("\t", 2)
        rows.append((int(rank), float(score), path))
    return rows


def _fails(capsys, argv: list[str]) -> str:
    """The error a failing command prints: one line on stderr (no traceback), nothing on stdout."""
    capsys.readouterr()
    assert main(argv) != 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("retrieve.py: error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("rerank", ["none", "superglobal"])
def test_query_lists_the_indexed_image_itself_first(rerank, built, folder, capsys):
    files = folder[1]
    rows = _query(capsys, built, files[2], "--k", "3", "--rerank", rerank)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][2] == str(files[2])
    assert sorted(r[2] for r in rows) == sorted(str(f) for f in files)  # every image once, notes.txt not indexed
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    if rerank == "none":
        assert rows[0][1] == pytest.approx(1.0, abs=1e-5)
        assert rows[1][1] < 1.0 - 1e-6


def test_cvnet_rerank_adds_between_0_and_mix_to_the_global_score(built, folder, capsys):
    files = folder[1]
    glob = {path: score for _, score, path in _query(capsys, built, files[0], "--k", "3")}
    rows = _query(capsys, built, files[0], "--k", "3", "--rerank", "cvnet", "--mix", "0.5")
    assert len(rows) == 3 and [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    for _, score, path in rows:
        assert glob[path] - 1e-5 <= score <= glob[path] + 0.5 + 1e-5


def test_grid_is_the_one_renderer_with_rank_score_and_name(built, folder, tmp_path, capsys):
    files = folder[1]
    grid_path = tmp_path / "grid.png"
    rows = _query(capsys, built, files[1], "--k", "3", "--grid", str(grid_path), "--bbox", "4,4,90,80")
    grid = cv2.imread(str(grid_path))
    hits = Retriever.load(built).query(str(files[1]), 3, bbox=(4, 4, 90, 80))
    assert [h.path for h in hits] == [r[2] for r in rows]
    query_img, tiles = query_tiles(files[1], hits, bbox=(4, 4, 90, 80))
    assert [(t.rank, t.name) for t in tiles] == [(r, Path(p).name) for r, _, p in rows]
    for tile, (_, _, path) in zip(tiles, rows):
        np.testing.assert_array_equal(tile.image, cv2.imread(path))
    # the grid the command wrote is helpers.visualize's rendering of these tiles (the title aside)
    expected = ranking_grid(query=query_img, hits=tiles, query_name=files[1].name, cols=6, legend=False)
    body = grid[grid.shape[0] - expected.shape[0]:]
    np.testing.assert_array_equal(body, expected)
    assert score_decimals([h.score for h in hits]) >= 4  # scores printed with digits enough to tell them apart


def test_post_processing_flags_reorder_the_shortlist(built, folder, capsys):
    files = folder[1]
    glob = _query(capsys, built, files[0], "--k", "3")
    capsys.readouterr()
    assert main(["query", "--index", str(built), "--image", str(files[0]), "--device", "cpu", "--quiet", "--k", "3",
                 "--aqe", "1", "--aqe-alpha", "0", "--dba", "1", "--kreciprocal", "--k1", "2", "--k2", "1",
                 "--shortlist", "3", "--rerank", "superglobal", "--sg-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "α-DBA k=1" in out and "α-QE k=1" in out and "k-reciprocal k1=2 k2=1" in out and "rerank superglobal" in out
    time_line = next(line for line in out.splitlines() if line.startswith("# time: "))
    for stage in ("describe query", "search", "post-processing", "re-ranking"):
        assert stage in time_line
    paths = [line.split("\t")[2] for line in out.splitlines() if not line.startswith("#")]
    assert sorted(paths) == sorted(r[2] for r in glob) and paths[0] == str(files[0])
    err = _fails(capsys, ["query", "--index", str(built), "--image", str(files[0]), "--kreciprocal", "--k1", "0",
                          "--quiet"])
    assert "post-processing" in err


def test_build_with_flip_and_a_timm_model(folder, tmp_path, capsys):
    index = tmp_path / "timm"
    capsys.readouterr()
    assert main(["build", "--images", str(folder[0]), "--index", str(index), "--device", "cpu", "--quiet",
                 "--model", "timm:resnet18", "--flip", "--scales", "1"]) == 0
    assert "TimmGlobal timm:resnet18, flip TTA" in capsys.readouterr().out
    settings = json.loads((index / "retriever.json").read_text())
    assert settings["settings"]["flip"] is True and settings["model"]["options"]["model_name"] == "resnet18"
    rows = _query(capsys, index, folder[1][2], "--k", "2")
    assert rows[0][2] == str(folder[1][2]) and rows[0][1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SystemExit):
        main(["build", "--images", str(folder[0]), "--index", str(tmp_path / "x"), "--model", "dino"])
    assert "timm:<timm model name>, got 'dino'" in capsys.readouterr().err


def test_bbox_crops_the_query(built, folder, capsys):
    files = folder[1]
    rows = _query(capsys, built, files[0], "--k", "3", "--bbox", "0,0,60,50")
    assert len(rows) == 3 and rows[0][1] < 1.0 - 1e-6  # a crop is no longer an exact duplicate
    assert parse_bbox("1, 2.5,30,40") == (1.0, 2.5, 30.0, 40.0)
    for bad in ("1,2,3", "a,b,c,d", "5,5,5,9"):
        with pytest.raises(ValueError, match="bbox"):
            parse_bbox(bad)
    err = _fails(capsys, ["query", "--index", str(built), "--image", str(files[0]), "--bbox", "1,2,3", "--quiet"])
    assert "--bbox" in err


def test_faiss_and_pinecone_backends_rank_alike(folder, tmp_path, capsys, monkeypatch):
    root, files = folder
    faiss_index = tmp_path / "faiss"
    assert main(["build", "--images", str(root), "--index", str(faiss_index), "--backend", "faiss",
                 "--scales", "1", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((faiss_index / "retriever.json").read_text())["model"]["options"]["scales"] == [1.0]
    reference = _query(capsys, faiss_index, files[1], "--k", "3")
    assert reference[0][2] == str(files[1]) and reference[0][1] == pytest.approx(1.0, abs=1e-5)

    with FakePinecone(2048) as fake:
        monkeypatch.setenv("PINECONE_API_KEY", fake.api_key)
        pine_index = tmp_path / "pinecone"
        assert main(["build", "--images", str(root), "--index", str(pine_index), "--backend", "pinecone",
                     "--host", fake.host, "--namespace", "photos", "--scales", "1", "--device", "cpu",
                     "--quiet"]) == 0
        assert len(fake.stored("photos")) == len(files)
        saved = (pine_index / "retriever.json").read_text()
        assert fake.api_key not in saved
        assert json.loads(saved)["database"] == {"backend": "pinecone", "namespace": "photos", "host": fake.host,
                                                 "index_name": None}
        rows = _query(capsys, pine_index, files[1], "--k", "3")
        assert [r[2] for r in rows] == [r[2] for r in reference]
        assert [r[1] for r in rows] == pytest.approx([r[1] for r in reference], abs=1e-5)
        # a namespace that already holds vectors is not silently appended to
        err = _fails(capsys, ["build", "--images", str(root), "--index", str(tmp_path / "again"), "--backend",
                              "pinecone", "--host", fake.host, "--namespace", "photos", "--quiet"])
        assert "--overwrite" in err


def test_build_errors_are_reported_clearly(folder, built, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("no images here")
    assert "no images" in _fails(capsys, ["build", "--images", str(empty), "--index", str(tmp_path / "i0")])
    assert "not found" in _fails(capsys, ["build", "--images", str(tmp_path / "nope"), "--index", str(tmp_path)])

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 truncated, not a JPEG")
    assert cv2.imwrite(str(mixed / "good.png"), _image(9))
    err = _fails(capsys, ["build", "--images", str(mixed), "--index", str(tmp_path / "i1"), "--device", "cpu",
                          "--quiet"])
    assert "broken.jpg" in err
    assert not (tmp_path / "i1" / "retriever.json").exists()
    capsys.readouterr()
    assert main(["build", "--images", str(mixed), "--index", str(tmp_path / "i2"), "--skip-unreadable",
                 "--device", "cpu", "--quiet"]) == 0
    assert "indexed 1 images" in capsys.readouterr().out

    assert "--overwrite" in _fails(capsys, ["build", "--images", str(folder[0]), "--index", str(built)])
    assert "CVPR2022_CVNet_R50.pyth" in _fails(capsys, ["build", "--images", str(folder[0]), "--index",
                                                        str(tmp_path / "i3"), "--weights", str(tmp_path / "w.pyth")])
    unfit = tmp_path / "unfit.pyth"
    torch.save({"model_state": {"encoder_q.nothing": torch.zeros(1)}}, unfit)
    assert "does not fit" in _fails(capsys, ["build", "--images", str(folder[0]), "--index", str(tmp_path / "i4"),
                                             "--weights", str(unfit), "--quiet"])
    assert "retriever.json" in _fails(capsys, ["query", "--index", str(tmp_path / "i0"), "--image",
                                               str(folder[1][0])])


def test_a_failed_pinecone_write_is_one_line(folder, tmp_path, capsys, monkeypatch):
    root, files = folder
    with FakePinecone(2048) as fake:
        monkeypatch.setenv("PINECONE_API_KEY", fake.api_key)
        fake.drop_ids = {"1"}  # acknowledged but never stored
        err = _fails(capsys, ["build", "--images", str(root), "--index", str(tmp_path / "p"), "--backend",
                              "pinecone", "--host", fake.host, "--scales", "1", "--device", "cpu", "--quiet"])
    assert "does not hold 1 ids" in err
    assert not (tmp_path / "p" / "retriever.json").exists()


def test_an_upsert_that_finally_fails_is_one_line(folder, tmp_path, capsys, monkeypatch):
    """Issue 11.11: the CLI showed a traceback when an upsert failed for good (every retry answered 503)."""
    import math

    root, _ = folder
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the SDK's and our backoffs, not the test's time
    with FakePinecone(2048) as fake:
        monkeypatch.setenv("PINECONE_API_KEY", fake.api_key)
        fake.fail_ids = {"2": math.inf}
        err = _fails(capsys, ["build", "--images", str(root), "--index", str(tmp_path / "p"), "--backend",
                              "pinecone", "--host", fake.host, "--scales", "1", "--device", "cpu", "--quiet"])
    assert "were not written to Pinecone" in err and "[0, 1, 2]" in err
    assert not (tmp_path / "p" / "retriever.json").exists()


def test_an_image_too_small_without_min_side_is_one_line_naming_it(tmp_path, capsys):
    """Issue 11.6: with no minimum side, SuperGlobal's padding failed on a small image with a RuntimeError naming
    no file; now one line names it and the option that fixes it."""
    root = tmp_path / "small"
    root.mkdir()
    assert cv2.imwrite(str(root / "tiny.png"), _image(5, 64, 80))
    err = _fails(capsys, ["build", "--images", str(root), "--index", str(tmp_path / "i"), "--min-side", "0",
                          "--scales", "1", "--device", "cpu", "--quiet"])
    assert "tiny.png" in err and "--min-side 96" in err


def test_bad_device_is_one_line(built, folder, capsys):
    err = _fails(capsys, ["query", "--index", str(built), "--image", str(folder[1][0]), "--device", "gpu", "--quiet"])
    assert "device" in err and "'gpu'" in err


def test_help_answers_fast_without_importing_torch():
    start = time.perf_counter()
    for argv in (["--help"], ["build", "--help"], ["query", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "retrieve.py", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage: retrieve.py" in done.stdout
        imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "numpy" not in imported
    assert time.perf_counter() - start < 3 * 2.0  # under 2 s each (typically 0.1 s)


# ---------------------------------------------------------------------------------------------- issue 19 rows


def test_a_failed_pinecone_rebuild_keeps_the_old_vectors(folder, tmp_path, capsys, monkeypatch):
    """Issue 19.1: `build --overwrite` emptied the namespace before indexing; the build then failed on a truncated
    JPEG, leaving 0 of the 6 vectors and a retriever.json over an empty database. The new vectors now go into a
    fresh namespace and the old ones are removed only once the new index is saved."""
    import shutil

    root, files = folder
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    data = (bad / "sub" / "img1.jpg").read_bytes()
    (bad / "sub" / "img1.jpg").write_bytes(data[: len(data) // 2])
    index = tmp_path / "pine"
    with FakePinecone(2048) as fake:
        monkeypatch.setenv("PINECONE_API_KEY", fake.api_key)
        pine = ["--backend", "pinecone", "--host", fake.host, "--namespace", "photos", "--scales", "1", "--device",
                "cpu", "--quiet"]
        assert main(["build", "--images", str(root), "--index", str(index), *pine]) == 0
        before = fake.stored("photos")
        saved = (index / "retriever.json").read_text()
        assert "img1.jpg" in _fails(capsys, ["build", "--images", str(bad), "--index", str(index), "--overwrite",
                                             *pine])
        assert {ns: len(v) for ns, v in fake.namespaces.items() if v} == {"photos": len(files)}
        assert all(np.array_equal(v, before[k]) for k, v in fake.stored("photos").items())
        assert (index / "retriever.json").read_text() == saved
        assert _query(capsys, index, files[0], "--k", "3")[0][2] == str(files[0])
        # a failure after some new vectors were written (id 1 acknowledged, never stored): they are taken back
        fake.drop_ids = {"1"}
        upserts = len(fake.requests_to("/vectors/upsert", ok_only=True))
        assert "does not hold 1 ids" in _fails(capsys, ["build", "--images", str(root), "--index", str(index),
                                                        "--overwrite", *pine])
        fake.drop_ids = set()
        assert len(fake.requests_to("/vectors/upsert", ok_only=True)) > upserts  # vectors 0 and 2 were written
        assert {ns: len(v) for ns, v in fake.namespaces.items() if v} == {"photos": len(files)}
        assert (index / "retriever.json").read_text() == saved
        # a rebuild that succeeds moves to a fresh namespace, then clears the old one; the next one moves back
        namespaces = []
        for _ in range(2):
            assert main(["build", "--images", str(root), "--index", str(index), "--overwrite", *pine]) == 0
            namespaces.append(json.loads((index / "retriever.json").read_text())["database"]["namespace"])
            assert {ns: len(v) for ns, v in fake.namespaces.items() if v} == {namespaces[-1]: len(files)}
            assert _query(capsys, index, files[2], "--k", "3")[0][2] == str(files[2])
        assert namespaces[0].startswith("photos.rebuild-") and namespaces[1] == "photos"


def test_a_build_into_a_folder_another_build_holds_is_refused(folder, tmp_path, capsys):
    """Issue 19.2: two builds into one --index both exited 0 and one index was silently replaced: the
    'already holds an index' check ran before the writer lock was taken. The lock now covers check and save."""
    import threading

    from helpers.retrieval.saved import writer_lock

    index = tmp_path / "race"
    holding, release = threading.Event(), threading.Event()

    def other_build() -> None:
        with writer_lock(index):
            holding.set()
            release.wait(timeout=120)

    other = threading.Thread(target=other_build)
    other.start()
    try:
        assert holding.wait(timeout=30)
        err = _fails(capsys, ["build", "--images", str(folder[0]), "--index", str(index), "--scales", "1",
                              "--device", "cpu", "--quiet"])
    finally:
        release.set()
        other.join()
    assert "race is being written by another build or save" in err
    assert not (index / "retriever.json").exists()


def test_grid_paths_are_checked_before_the_query(built, folder, tmp_path, capsys):
    """Issue 19.3 and 19.15: --grid naming an indexed image replaced it with the grid; a folder or a name without
    an extension failed with a cv2.error traceback after the results were printed."""
    query = str(folder[1][0])
    victim = tmp_path / "photo.jpg"
    victim.write_bytes(b"an image someone cares about")
    for grid, said in ((victim, "already exists: pass --overwrite"), (tmp_path, "is a folder"),
                       (tmp_path / "grid", "must end in .png, .jpg, .jpeg, .bmp, .webp, .tif or .tiff"),
                       (tmp_path / "g.gif", "must end in")):
        assert said in _fails(capsys, ["query", "--index", str(built), "--image", query, "--grid", str(grid),
                                       "--quiet"])  # (_fails: nothing printed on stdout: the query did not run)
    assert victim.read_bytes() == b"an image someone cares about"
    _query(capsys, built, folder[1][0], "--grid", str(victim), "--overwrite")
    assert cv2.imread(str(victim)) is not None


def test_names_of_any_bytes_build_query_and_grid(folder, tmp_path):
    """Issue 19.4: a file name that is not UTF-8 crashed build (also with --skip-unreadable), query --image and
    --grid with a segmentation fault (cv2.imread/imwrite on the path). Run in a child process, so that a crash
    fails this test only."""
    import os

    odd = tmp_path / "odd"
    odd.mkdir()
    shutil_copy = (folder[1][0]).read_bytes()
    (odd / "ok.png").write_bytes(shutil_copy)
    name = os.fsencode(str(odd)) + b"/bad\xff\xfe.png"
    with open(name, "wb") as f:
        f.write((folder[1][1]).read_bytes())
    grid = os.fsencode(str(tmp_path)) + b"/g\xff.png"
    script = (
        "import os, sys\n"
        "from retrieve import main\n"
        "odd, index, image, grid = (os.fsdecode(bytes.fromhex(a)) for a in sys.argv[1:])\n"
        "common = ['--device', 'cpu', '--quiet']\n"
        "assert main(['build', '--images', odd, '--index', index, '--scales', '1', *common]) == 0\n"
        "assert main(['query', '--index', index, '--image', image, '--k', '2', '--grid', grid, *common]) == 0\n")
    args = [a.hex() for a in (os.fsencode(str(odd)), os.fsencode(str(tmp_path / "idx")), name, grid)]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, timeout=300)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert "indexed 2 images" in out and f"1\t1.000000\t{odd}/bad\\xff\\xfe.png" in out.replace("0.99999", "1.00000")
    assert cv2.imdecode(np.fromfile(grid, np.uint8), cv2.IMREAD_COLOR) is not None


@pytest.mark.parametrize("flags", [["--rerank", "superglobal", "--sg-beta", "nan"],
                                   ["--aqe", "2", "--aqe-alpha", "inf"], ["--dba", "2", "--dba-alpha", "nan"],
                                   ["--kreciprocal", "--lambda", "nan"], ["--mix", "inf"], ["--lambda", "1.5"]])
def test_nan_and_inf_flags_are_refused_naming_the_flag(flags, built, folder, capsys):
    """Issue 19.7: NaN or inf settings were accepted and every score printed as nan, exit 0."""
    with pytest.raises(SystemExit) as caught:
        main(["query", "--index", str(built), "--image", str(folder[1][0]), "--quiet", *flags])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and f"argument {flags[-2]}" in err and repr(flags[-1]) in err


def test_paths_with_tabs_and_newlines_print_as_one_field_of_one_line(tmp_path, capsys):
    """Issue 19.14: a newline in a path split a record, a tab added a field."""
    root = tmp_path / "names"
    root.mkdir()
    names = ["a\tb.png", "c\nd.png", "e\\f.png"]
    for i, name in enumerate(names):
        assert cv2.imwrite(str(root / name), _image(20 + i, 96, 112))
    index = tmp_path / "idx"
    assert main(["build", "--images", str(root), "--index", str(index), "--scales", "1", "--device", "cpu",
                 "--quiet"]) == 0
    rows = _query(capsys, index, root / names[0], "--k", "5")
    assert len(rows) == 3 and all("\t" not in path and "\n" not in path for _, _, path in rows)
    assert sorted(path for _, _, path in rows) == sorted(f"{root}/{n}" for n in ("a\\tb.png", "c\\nd.png",
                                                                                 "e\\\\f.png"))
    assert format_hits([Hit(id=7, score=0.5)]) == ["1\t0.500000\tid:7"]


def test_issue_19_one_line_errors_and_capped_k(built, folder, tmp_path, capsys):
    """Issue 19.16: --index equal to --images said only 'no images found'; --shortlist 0 --aqe 2 printed the whole
    settings object. Issue 19.10: --k 1000000000000 tried to allocate 4 TB. Issue 19.5/19.6: a decompression
    bomb or a PNG over OpenCV's limit as the query: one line, said before the model is loaded."""
    import shutil

    from tests.support.hostile_images import bomb_png

    same = tmp_path / "same"
    shutil.copytree(folder[0], same)
    err = _fails(capsys, ["build", "--images", str(same), "--index", str(same), "--quiet"])
    assert "3 image file(s) there lie inside the index folder" in err and "--index" in err
    err = _fails(capsys, ["query", "--index", str(built), "--image", str(folder[1][0]), "--shortlist", "0",
                          "--aqe", "2", "--quiet"])
    assert err.endswith("invalid post-processing settings: shortlist=0 (a whole number >= 1)")
    rows = _query(capsys, built, folder[1][0], "--k", "1000000000000")
    assert len(rows) == len(folder[1])
    for side in (30000, 40000):
        bomb_png(tmp_path / f"bomb{side}.png", side, side)
        err = _fails(capsys, ["query", "--index", str(built), "--image", str(tmp_path / f"bomb{side}.png"),
                              "--quiet"])
        assert f"{side} x {side} = {side * side:,} pixels is over the limit of 134,217,728" in err
    err = _fails(capsys, ["query", "--index", str(built), "--image", str(folder[1][0]), "--max-pixels", "100",
                          "--quiet"])
    assert "is over the limit of 100" in err


def test_skip_unreadable_skips_and_counts_an_image_over_the_limit(folder, tmp_path, capsys, caplog):
    """Issue 19.6: `build --skip-unreadable` aborted the whole build on a PNG over OpenCV's pixel limit."""
    import shutil

    from tests.support.hostile_images import bomb_png

    mixed = tmp_path / "mixed"
    shutil.copytree(folder[0], mixed)
    bomb_png(mixed / "huge.png", 40000, 40000)
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(["build", "--images", str(mixed), "--index", str(tmp_path / "i"), "--skip-unreadable",
                     "--scales", "1", "--device", "cpu", "--quiet"]) == 0
    assert f"indexed {len(folder[1])} images" in capsys.readouterr().out
    assert f"1 of {len(folder[1]) + 1} images were skipped" in caplog.text and "huge.png" in caplog.text
