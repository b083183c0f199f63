"""Start a training script as two CPU ranks (gloo) the way torchrun would, through the environment."""
import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_cpu_ranks(args: list[str], timeout: float = 300) -> None:
    """Run ``args`` as ranks 0 and 1 of one job; each must exit 0 (its stderr tail is the failure message)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(timeout=timeout) == 0, p.stderr.read().decode()[-2000:]
