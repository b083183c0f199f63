"""Download planning offline, and md5 / extraction / the CLI against a local HTTP server on 127.0.0.1 (the fetch
itself, resume included, is tested in tests/common/test_download.py)."""
import hashlib
import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from datasets.download import DOWNLOADS, RemoteFile, download, extract_archive, extraction_marker, plan_downloads

ROOT = Path(__file__).resolve().parents[2]


def prepare_data(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python prepare_data.py ARGS`` from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_table_holds_the_documented_urls():
    rox = {f.url: f for f in DOWNLOADS["roxford5k"]}
    assert rox["http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"].dest == \
        "roxford5k/gnd_roxford5k.pkl"
    tar = rox["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"]
    assert tar.extract_to == "roxford5k/jpg" and tar.flatten
    par = [f.url for f in DOWNLOADS["rparis6k"]]
    assert par[1:] == [f"https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{i}-v1.tgz" for i in (1, 2)]
    r1m = DOWNLOADS["revisitop1m"]
    assert r1m[0].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
    assert [f.url for f in r1m[1:]] == [
        f"http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{i}.tar.gz" for i in range(1, 101)]
    assert all(f.extract_to == "revisitop1m/jpg" and not f.flatten for f in r1m[1:])


def test_plan_skips_complete_resumes_part_and_reports_md5(tmp_path):
    good, bad = b"hello world", b"corrupted"
    table = {"toy": (
        RemoteFile("toy", "http://x/a.bin", "toy/a.bin"),                       # complete, no md5 -> skipped
        RemoteFile("toy", "http://x/b.bin", "toy/b.bin"),                       # .part -> resume
        RemoteFile("toy", "http://x/c.bin", "toy/c.bin", md5=hashlib.md5(good).hexdigest()),  # mismatch
        RemoteFile("toy", "http://x/d.bin", "toy/d.bin", md5=hashlib.md5(good).hexdigest()),  # md5 ok
        RemoteFile("toy", "http://x/e.tgz", "toy/e.tgz", extract_to="toy/jpg"),  # marker -> skipped
        RemoteFile("toy", "http://x/f.tgz", "toy/f.tgz", extract_to="toy/jpg"),  # archive here -> extract
        RemoteFile("toy", "http://x/g.bin", "toy/g.bin"),                       # nothing -> download
    )}
    (tmp_path / "toy" / "jpg").mkdir(parents=True)
    (tmp_path / "toy" / "a.bin").write_bytes(b"anything")
    (tmp_path / "toy" / "b.bin.part").write_bytes(b"x" * 1234)
    (tmp_path / "toy" / "c.bin").write_bytes(bad)
    (tmp_path / "toy" / "d.bin").write_bytes(good)
    open(extraction_marker(tmp_path, table["toy"][4]), "w").close()
    (tmp_path / "toy" / "f.tgz").write_bytes(b"tar")
    plan = plan_downloads(tmp_path, ["toy"], table=table)
    by_name = {p.remote.url.rsplit("/", 1)[1]: p for p in plan}
    assert sorted(by_name) == ["b.bin", "c.bin", "f.tgz", "g.bin"]
    assert by_name["b.bin"].action == "resume" and by_name["b.bin"].offset == 1234
    assert by_name["c.bin"].action == "redownload"
    assert hashlib.md5(bad).hexdigest() in by_name["c.bin"].reason and "md5 mismatch" in by_name["c.bin"].reason
    assert by_name["f.tgz"].action == "extract" and by_name["g.bin"].action == "download"
    assert by_name["g.bin"].path == str(tmp_path / "toy" / "g.bin")
    with pytest.raises(ValueError, match="unknown datasets"):
        plan_downloads(tmp_path, ["imagenet"], table=table)


def test_plan_for_an_empty_root_lists_everything(tmp_path):
    plan = plan_downloads(tmp_path, ["roxford5k", "rparis6k", "revisitop1m"])
    assert len(plan) == 2 + 3 + 101 and all(p.action == "download" for p in plan)


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_download_verifies_md5_extracts_flat_and_is_idempotent(tmp_path, http_server):
    gnd, archive = b"ground truth bytes", _tgz({"paris/defense/a.jpg": b"A", "paris/eiffel/b.jpg": b"BB"})
    http_server.files.update({"/gnd.pkl": gnd, "/imgs.tgz": archive})
    table = {"toy": (
        RemoteFile("toy", f"{http_server.url}/gnd.pkl", "toy/gnd.pkl", md5=hashlib.md5(gnd).hexdigest()),
        RemoteFile("toy", f"{http_server.url}/imgs.tgz", "toy/imgs.tgz", extract_to="toy/jpg", flatten=True),
    )}
    plan = plan_downloads(tmp_path, ["toy"], table=table)
    download(plan, root=tmp_path, progress=False)
    assert (tmp_path / "toy" / "gnd.pkl").read_bytes() == gnd
    assert (tmp_path / "toy" / "jpg" / "a.jpg").read_bytes() == b"A"
    assert (tmp_path / "toy" / "jpg" / "b.jpg").read_bytes() == b"BB"
    assert not (tmp_path / "toy" / "imgs.tgz").exists()  # archives are removed once extracted
    assert plan_downloads(tmp_path, ["toy"], table=table) == []


def test_download_md5_mismatch_raises_and_removes(tmp_path, http_server):
    http_server.files["/x.bin"] = b"what the server has"
    table = {"toy": (RemoteFile("toy", f"{http_server.url}/x.bin", "toy/x.bin", md5="0" * 32),)}
    with pytest.raises(ValueError, match="md5 mismatch"):
        download(plan_downloads(tmp_path, ["toy"], table=table), root=tmp_path, progress=False)
    assert not (tmp_path / "toy" / "x.bin").exists()


def test_extract_keeps_tree_and_refuses_escapes(tmp_path):
    good = tmp_path / "good.tgz"
    good.write_bytes(_tgz({"1/2/x.jpg": b"x", "3/y.jpg": b"yy"}))
    assert extract_archive(str(good), str(tmp_path / "out"), flatten=False) == 2
    assert (tmp_path / "out" / "1" / "2" / "x.jpg").read_bytes() == b"x"
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(_tgz({"../escaped.txt": b"!"}))
    with pytest.raises(tarfile.TarError):
        extract_archive(str(evil), str(tmp_path / "out2"), flatten=False)
    assert not (tmp_path / "escaped.txt").exists()
    extract_archive(str(evil), str(tmp_path / "out3"), flatten=True)  # flattening keeps only the base name
    assert (tmp_path / "out3" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_cli_dry_run_prints_the_plan(tmp_path):
    run = prepare_data("download", "--root", str(tmp_path), "--datasets", "roxford5k", "revisitop1m", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "oxbuild_images-v1.tgz" in run.stdout and "gnd_roxford5k.pkl" in run.stdout
    assert "revisitop1m.100.tar.gz" in run.stdout and "revisitop1m.txt" in run.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_cli_downloads_and_reports_errors_in_one_line(tmp_path, http_server, monkeypatch, capsys):
    """A real run against the local server (through the table), then a failed transfer: one line, exit != 0."""
    import datasets.download as download_module

    gnd = b"ground truth"
    http_server.files["/gnd.pkl"] = gnd
    monkeypatch.setitem(download_module.DOWNLOADS, "roxford5k",
                        (RemoteFile("roxford5k", f"{http_server.url}/gnd.pkl", "roxford5k/gnd_roxford5k.pkl"),))
    from prepare_data import main

    assert main(["download", "--root", str(tmp_path), "--datasets", "roxford5k"]) == 0
    assert (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").read_bytes() == gnd
    monkeypatch.setitem(download_module.DOWNLOADS, "rparis6k",
                        (RemoteFile("rparis6k", f"{http_server.url}/missing.pkl", "rparis6k/gnd_rparis6k.pkl"),))
    capsys.readouterr()
    assert main(["download", "--root", str(tmp_path), "--datasets", "rparis6k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare_data.py download: error: download of") and "HTTP 404" in err
    assert err.count("\n") == 1


def test_cli_help_is_fast_and_torch_free():
    code = ("import runpy, sys\n"
            "for argv in (['--help'], ['download', '--help'], ['synthetic', '--help'], ['weights', '--help']):\n"
            "    sys.argv = ['prepare_data.py', *argv]\n"
            "    try:\n"
            "        runpy.run_path('prepare_data.py', run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'cv2', 'numpy'}))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"  # --help imports neither torch nor OpenCV/numpy
    start = time.perf_counter()
    assert prepare_data("--help").returncode == 0
    assert time.perf_counter() - start < 2.0


def test_cli_errors_are_one_line(tmp_path):
    run = prepare_data("download", "--root", str(tmp_path), "--datasets", "imagenet")
    assert run.returncode != 0 and "invalid choice" in run.stderr and "Traceback" not in run.stderr


def test_md5_from_a_published_md5_file(tmp_path, http_server):
    """GLDv2 publishes one md5sum file per tar: fetched beside the tar, checked before extraction."""
    archive = _tgz({"0/1/2/0123456789abcdef.jpg": b"jpeg bytes"})
    http_server.files.update({"/index/images_000.tar": archive,
                         "/md5sum/index/md5.images_000.txt": f"{hashlib.md5(archive).hexdigest()}  images_000.tar\n"
                         .encode(),
                         "/index/images_001.tar": archive,
                         "/md5sum/index/md5.images_001.txt": b"0123456789abcdef0123456789abcdef  images_001.tar\n"})
    table = {"toy": tuple(
        RemoteFile("toy", f"{http_server.url}/index/images_00{i}.tar", f"toy/tars/images_00{i}.tar",
                   extract_to="toy/index", md5_url=f"{http_server.url}/md5sum/index/md5.images_00{i}.txt")
        for i in (0, 1))}
    with pytest.raises(ValueError, match=r"md5 mismatch .*images_001\.tar"):
        download(plan_downloads(tmp_path, ["toy"], table=table), root=tmp_path, progress=False)
    assert (tmp_path / "toy" / "index" / "0" / "1" / "2" / "0123456789abcdef.jpg").read_bytes() == b"jpeg bytes"
    assert (tmp_path / "toy" / "tars" / "md5.images_000.txt").is_file()
    assert not (tmp_path / "toy" / "tars" / "images_001.tar").exists()  # the bad tar is removed
    # a tar already here whose published md5 differs is planned again
    (tmp_path / "toy" / "tars" / "images_001.tar").write_bytes(b"stale")
    (plan,) = plan_downloads(tmp_path, ["toy"], table=table)
    assert plan.action == "redownload" and "md5 mismatch" in plan.reason


def test_cli_dry_run_plans_the_gldv2_retrieval_test(tmp_path):
    run = prepare_data("download", "--root", str(tmp_path), "--datasets", "gldv2-retrieval-test", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "https://s3.amazonaws.com/google-landmark/index/images_099.tar" in run.stdout
    assert "https://s3.amazonaws.com/google-landmark/ground_truth/retrieval_solution_v2.1.csv" in run.stdout
    assert not any(tmp_path.iterdir())
