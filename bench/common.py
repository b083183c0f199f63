"""Shared pieces of the benchmarks: process set-up, timing, peak memory, the machine's description, tables.

Every benchmark measures its baseline and its fast path in the same process, interleaved (A, B, A, B, ...), and
reports medians, so that load from other processes on a shared machine hits both sides alike; the *ratio* is the
figure to compare across machines, the absolute times are those of the machine printed in the header.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from helpers.distributed import DEVICE_CHOICES, DeviceError, resolve_device

#: torch's CPU allocator asks the kernel for transparent huge pages on large allocations when this is set.
#: It is read once, at the first large allocation of the process, and only matters where fresh pages are costly
#: (first-touch page faults of a VM: 0.3-1.5 GB/s on the benchmark machine, against 6-8 GB/s with huge pages).
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions of each measurement")
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default: cpu)")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 float32 matrix products and convolutions on a GPU (off: float32 is float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-thp", action="store_true",
                        help=f"do not set {THP_ENV}=1 (torch's huge-page allocation) for this process")
    parser.add_argument("--no-ftz", action="store_true",
                        help="keep denormal floats (random weights produce them; on x86 they are ~50x slower)")


def setup_process(args: argparse.Namespace) -> torch.device:
    """Apply the common options: threads (torch and faiss alike), huge pages, seed; returns the device (with
    the TF32 policy of ``--tf32``, :func:`helpers.distributed.set_tf32`)."""
    if not args.no_thp:
        os.environ.setdefault(THP_ENV, "1")
    if not args.no_ftz:
        # Random weights drive activations into the denormal range, where x86 arithmetic is tens of times slower;
        # trained weights do not. Flushing them to zero keeps random-weight timings representative.
        torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        pass
    torch.manual_seed(args.seed)
    try:
        return resolve_device(args.device, tf32=args.tf32)
    except DeviceError as exc:
        raise SystemExit(f"--device: {exc}") from None


#: The fast paths' compute dtypes (``--dtype``); the half-precision ones run under CUDA autocast.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The ``--dtype`` of a fast path; half precision is a CUDA option (autocast)."""
    dtype = DTYPES[name]
    if dtype != torch.float32 and device.type != "cuda":
        raise SystemExit(f"--dtype {name} is a CUDA option (autocast); on the CPU use float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """The autocast a fast path runs under: ``dtype`` on ``device`` for the half dtypes, none for float32. The
    tests use it on the CPU, whose autocast rounds the same ops to the same dtypes as CUDA's."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class InMemory(Dataset):
    """Preprocessed images as a dataset: item i = the list of per-scale (3, H_s, W_s) tensors of image i, what the
    revisited datasets yield and what the extraction engine reads."""

    def __init__(self, items: Sequence[Sequence[Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[Tensor]:
        return list(self.items[i])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field (``MemTotal``, ``MemAvailable``, ...) in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What the figures depend on: CPU, cores, threads, memory, library versions, GPU, allocator, load."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "thp_alloc": os.environ.get(THP_ENV, "0"),
    }
    total = meminfo_bytes("MemTotal")
    if total is not None:
        info["memory_gb"] = round(total / 2**30, 1)
    try:
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def print_header(title: str, info: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
    print(f"== {title}")
    print("   machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if settings:
        print("   settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """(seconds, result) of one call, waiting for the GPU where there is one."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Seconds of each call over ``repeats`` rounds, the functions taking turns within a round.

    ``warmup`` untimed rounds first (lazy initialisation, oneDNN kernel creation, caches).
    """
    for _ in range(warmup):
        for fn in fns.values():
            time_once(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device)[0])
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every ``interval`` seconds.

    ``peak_mb`` is the largest RSS seen, ``delta_mb`` its excess over the RSS at entry (what the block itself
    needed, torch's C++ allocations included, which tracemalloc does not see).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self.rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0 or 0.01 <= abs(x) < 1e5:
            return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
        return f"{x:.3g}"
    return str(x)


#: Rows drawn at a time by :func:`unit_vector_blocks`: a 1M-vector database is never held twice in float32.
UNIT_ROWS = 32768


def unit_vector_blocks(n: int, d: int, generator: torch.Generator, *, rows: int = UNIT_ROWS) -> Iterator[Tensor]:
    """``n`` random unit vectors drawn from ``generator``, yielded as float32 blocks (<= ``rows``, d): the same
    vectors for the same generator state, whatever the caller does with each block."""
    for start in range(0, n, rows):
        yield F.normalize(torch.randn(min(rows, n - start), d, generator=generator), dim=1)


def unit_vectors(n: int, d: int, *, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` seeded random unit vectors (n, d) stored in ``dtype``, filled block by block (no float32 copy of a
    float16 database)."""
    out = torch.empty(n, d, dtype=dtype)
    start = 0
    for block in unit_vector_blocks(n, d, torch.Generator().manual_seed(seed)):
        out[start : start + block.shape[0]] = block
        start += block.shape[0]
    return out


def ratio(baseline_seconds: float, fast_seconds: float) -> str:
    """Speed-up of the fast path over the baseline, 'N.Nx'."""
    return f"{baseline_seconds / fast_seconds:.2f}x" if fast_seconds > 0 else "inf"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def check_equal(name: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    """Print the largest difference of the fast path from the faithful one and whether it is within ``atol``."""
    diff = max_abs_diff(a, b)
    ok = diff <= atol
    print(f"   equality {name}: max |fast - faithful| = {diff:.2e} ({'OK' if ok else 'FAIL'}, tolerance {atol:g})")
    return ok
