"""fewshot.py: --help answers without torch; bad input is one line and exit code 2."""
import subprocess
import sys
from pathlib import Path

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
