"""How the training-script tests start the scripts: as two CPU ranks (gloo) the way torchrun would, through the
environment, and as a fresh interpreter that records which modules it imported (config errors must answer
before torch is imported)."""
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_cpu_ranks(args: list[str], timeout: float = 300) -> list[str]:
    """Run ``args`` as ranks 0 and 1 of one job, one OpenMP thread each; each must exit 0 (the tail of its output is
    the failure message). Returns each rank's stdout and stderr together (the scripts log on stdout), read from a
    file so that no pipe fills up."""
    port = free_port()
    procs, logs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            logs.append(Path(tmp) / f"rank{rank}.log")
            with open(logs[-1], "wb") as out:
                procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        texts = [log.read_text(errors="replace") for log in logs]
    for code, text in zip(codes, texts):
        assert code == 0, text[-2000:]
    return texts


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str  # without the import-time lines
    modules: set[str]  # every module the interpreter imported
    seconds: float


def run_recording_imports(script: Path, *args: str, timeout: float = 60) -> ScriptRun:
    """``python -X importtime script args...``: its outcome, wall time and imported modules."""
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", str(script), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=script.parent)
    seconds = time.perf_counter() - start
    lines = p.stderr.splitlines()
    modules = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return ScriptRun(p.returncode, p.stdout, stderr, modules, seconds)
