"""fewshot.py: --help answers without torch; bad input is one line and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_imports_no_torch():
    code = ("import sys, runpy; sys.argv = ['fewshot.py', '--help']\n"
            "try:\n    runpy.run_path('fewshot.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = _run("-c", code)
    assert "--shots" in out.stdout and out.stdout.strip().endswith("NO-TORCH")


def test_bad_device_is_one_line(tmp_path):
    out = _run("fewshot.py", "--root", str(tmp_path), "--device", "gpu")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("fewshot.py: error: device must be one of")
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_any_class_folder_is_classified(tmp_path):
    """--folder: classification by retrieval over PATH/<class>/<images>; classes with too few images for the shots
    are left out and counted, and shots no class can give are one line."""
    from datasets.synthetic import SyntheticConfig
    from datasets.synthetic.class_folder import write_class_folder

    config = SyntheticConfig(n_landmarks=3, views_per_landmark=3, n_distractors=1, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2)
    gallery = write_class_folder(tmp_path / "classes", root=tmp_path / "data", config=config) / "test" / "gallery"
    out = _run("fewshot.py", "--folder", str(gallery), "--shots", "1", "2", "--trials", "2", "--model",
               "timm:resnet18", "--device", "cpu", timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"9 images of 3 classes in {gallery}" in out.stdout  # the distractor (no class) is left out
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert [(r[0].strip(), r[3].strip(), r[4].strip()) for r in rows] == [("1", "6", "3"), ("2", "3", "3")]
    out = _run("fewshot.py", "--folder", str(gallery), "--shots", "3", "--model", "timm:resnet18", "--device", "cpu",
               timeout=300)
    assert out.returncode == 2 and "3 shots need more than 3 examples" in out.stderr.strip().splitlines()[-1]


def test_negative_threads_is_one_line(tmp_path):
    out = _run("fewshot.py", "--root", str(tmp_path), "--threads", "-1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "fewshot.py: error: argument --threads: must be >= 0, got -1"
    assert "Traceback" not in out.stderr
