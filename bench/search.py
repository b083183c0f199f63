"""Exact top-k search: TensorVectorDB (float32 and float16 storage) against FAISS ``IndexFlatIP``.

Queries per second for a batch of queries (``--nq``, 70 like revisited Oxford/Paris) and for single queries,
the peak memory of a search and of the index, on the same number of threads for both libraries. Also the
machine's limits: the achievable memory read bandwidth (a large sum and a matrix-vector product, GB/s) and
float32 GEMM rate, and the lower bound they imply on the time of one search, max(bytes scanned / bandwidth,
multiply-adds / GEMM rate), with each back-end's distance to it.

Back-ends are built one after the other (at 1M x 2048 one float32 copy is 8 GB) from the same seeded vectors.
Run: ``python -m bench.search`` (``--quick`` for a smoke test, ``--sizes 100000`` to skip the 1M run).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    PeakRSS,
    add_common_args,
    format_table,
    interleaved,
    machine_info,
    median,
    meminfo_bytes,
    print_header,
    setup_process,
    time_once,
)
from helpers.builders import make_database

_GEN_ROWS = 32768
_BYTES_PER_VALUE = {"faiss": 4, "tensor32": 4, "tensor16": 2}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sizes", default="100000,1000000", help="database sizes, comma-separated")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--nq", type=int, default=70, help="queries of the batched search")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=None, help="TensorVectorDB chunk (default: its own)")
    p.add_argument("--backends", default="faiss,tensor32,tensor16",
                   help="which of faiss, tensor32, tensor16 to run")
    return p


def unit_vectors(n: int, d: int, *, seed: int, rows: int = _GEN_ROWS) -> Iterator[torch.Tensor]:
    """The same ``n`` random unit vectors (d,) for a given seed, yielded in blocks of ``rows``."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, rows):
        yield F.normalize(torch.randn(min(rows, n - start), d, generator=g), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The machine's limits
# ----------------------------------------------------------------------------------------------------------------


def read_bandwidth_gbs(*, mb: int = 1024, repeats: int = 3) -> dict[str, float]:
    """Achievable read bandwidth, GB/s: a float32 sum and a matrix-vector product over ``mb`` MB."""
    n = mb * 2**20 // 4
    x = torch.ones(n)
    mat = x.view(-1, 1024)
    v = torch.ones(1024)
    out: dict[str, float] = {}
    for name, fn in (("sum", lambda: x.sum()), ("gemv", lambda: mat @ v)):
        fn()
        best = min(time_once(fn)[0] for _ in range(repeats))
        out[name] = n * 4 / best / 1e9
    return out


def gemm_gflops(*, size: int = 2048, repeats: int = 3) -> float:
    """float32 GEMM rate of this machine (torch's BLAS), GFLOP/s on (size x size) @ (size x size)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(time_once(lambda: a @ b)[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def lower_bound_s(*, n: int, d: int, nq: int, bytes_per_value: int, bandwidth_gbs: float, gflops: float) -> float:
    """A search cannot beat both reading the database once and doing its multiply-adds at the GEMM rate."""
    return max(n * d * bytes_per_value / (bandwidth_gbs * 1e9), 2 * nq * n * d / (gflops * 1e9))


# ----------------------------------------------------------------------------------------------------------------
# Back-ends
# ----------------------------------------------------------------------------------------------------------------


def build(kind: str, *, n: int, d: int, seed: int, chunk_size: int | None) -> tuple[Any, float, float]:
    """(database, build seconds, index MB) of back-end ``kind`` over the seeded vectors."""
    start = time.perf_counter()
    if kind == "faiss":
        db: Any = make_database("faiss", d, index="flat", use_gpu=False)
    else:
        dtype = torch.float32 if kind == "tensor32" else torch.float16
        kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
        db = make_database("tensor", d, dtype=dtype, progress=False, **kwargs)
        db.reserve(n)
    offset = 0
    for block in unit_vectors(n, d, seed=seed):
        db.add(block, ids=torch.arange(offset, offset + block.shape[0]))
        offset += block.shape[0]
    return db, time.perf_counter() - start, n * d * _BYTES_PER_VALUE[kind] / 2**20


def phases(kinds: Sequence[str], *, n: int, d: int, budget_bytes: float) -> list[list[str]]:
    """Back-ends built together and timed interleaved: all of them when they fit in ``budget_bytes``, else each
    one beside the first (the reference, e.g. faiss), so that every comparison is made under the same load."""
    if sum(_BYTES_PER_VALUE[k] for k in kinds) * n * d <= budget_bytes or len(kinds) < 2:
        return [list(kinds)]
    return [[kinds[0], k] for k in kinds[1:]]


def run_phase(kinds: Sequence[str], *, n: int, d: int, queries: torch.Tensor, args: argparse.Namespace,
              repeats: int, bandwidth_gbs: float, gflops: float) -> tuple[list[list], dict[tuple[str, int], float]]:
    """Build ``kinds`` over the same vectors, then time their batched and single-query searches interleaved.

    Returns the table rows and {(kind, nq): median seconds}. Agreement is reported against the first kind.
    """
    built = {kind: build(kind, n=n, d=d, seed=args.seed, chunk_size=args.chunk_size) for kind in kinds}
    rows, medians = [], {}
    for nq in sorted({args.nq, 1}, reverse=True):
        xq = queries[:nq]
        results, peaks = {}, {}
        for kind, (db, _, _) in built.items():
            with PeakRSS() as mem:  # a first search allocates its buffers: its peak is the search's memory
                results[kind] = db.search(xq, args.k)
            peaks[kind] = mem.delta_mb
        times = interleaved({kind: (lambda db=db, xq=xq: db.search(xq, args.k)) for kind, (db, _, _) in built.items()},
                            repeats=repeats, warmup=0)
        ref_kind = kinds[0]
        for kind, (_, build_s, index_mb) in built.items():
            t = median(times[kind])
            medians[(kind, nq)] = t
            bound = lower_bound_s(n=n, d=d, nq=nq, bytes_per_value=_BYTES_PER_VALUE[kind],
                                  bandwidth_gbs=bandwidth_gbs, gflops=gflops)
            agree = ""
            if kind != ref_kind:
                (s_ref, i_ref), (s, i) = results[ref_kind], results[kind]
                agree = (f"{(i == i_ref).float().mean().item():.1%} ids, max |ds| "
                         f"{(s - s_ref).abs().max().item():.1e}; {t / median(times[ref_kind]):.2f}x {ref_kind}'s time")
            rows.append([n, kind, nq, t * 1000, nq / t, bound * 1000, f"{bound / t:.0%}", peaks[kind], index_mb,
                         build_s, agree])
    return rows, medians


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_process(args)
    sizes = [20000] if args.quick else [int(s) for s in args.sizes.split(",")]
    d = 256 if args.quick else args.dim
    repeats = args.repeats or (1 if args.quick else 3)
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    try:
        import faiss  # noqa: F401
    except ImportError:
        if "faiss" in kinds:
            print("   faiss is not installed (pip install faiss-cpu): skipping it")
            kinds.remove("faiss")
    info = machine_info()
    print_header(f"Exact top-{args.k} search, inner product, d={d}", info, {
        "sizes": sizes, "nq": args.nq, "repeats": repeats, "backends": kinds,
        "threads (torch = faiss)": torch.get_num_threads()})

    bw = read_bandwidth_gbs(mb=64 if args.quick else 1024)
    gflops = gemm_gflops(size=512 if args.quick else 2048)
    best_bw = max(bw.values())
    print(f"   memory read bandwidth: sum {bw['sum']:.1f} GB/s, gemv {bw['gemv']:.1f} GB/s -> {best_bw:.1f} GB/s; "
          f"float32 GEMM {gflops:.0f} GFLOP/s")

    g = torch.Generator().manual_seed(args.seed + 1000)
    queries = F.normalize(torch.randn(args.nq, d, generator=g), dim=1)
    budget = 0.6 * (meminfo_bytes("MemAvailable") or 8e9)  # 8 GB where unknown
    rows = []
    for n in sizes:
        for phase in phases(kinds, n=n, d=d, budget_bytes=budget):
            phase_rows, _ = run_phase(phase, n=n, d=d, queries=queries, args=args, repeats=repeats,
                                      bandwidth_gbs=best_bw, gflops=gflops)
            rows += phase_rows
            gc.collect()
    print(format_table(["n", "backend", "nq", "ms/search", "queries/s", "bound ms", "of bound",
                        "search extra RSS MB", "index MB", "build s", "agreement (interleaved timing)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
