"""Top-k search: TensorVectorDB (float32 and float16 storage) and FAISS HNSW against FAISS ``IndexFlatIP``.

Queries per second for a batch of queries (``--nq``, 70 like revisited Oxford/Paris) and for single queries,
the peak memory of a search and of the index, on the same number of threads for both libraries. Also the
machine's limits: the achievable memory read bandwidth (a large sum and a matrix-vector product, GB/s) and
float32 GEMM rate, and the lower bound they imply on the time of one search, max(bytes scanned / bandwidth,
multiply-adds / GEMM rate), with each back-end's distance to it.

The approximate FAISS HNSW index (``FaissVectorDB(index="hnsw")``) is timed beside them, one graph searched with
each ``--hnsw-ef-search`` value, and reported with its recall@k against the exact top-k of ``IndexFlatIP`` on the
same queries and its speed-up over it. Its graph is built only up to ``--hnsw-max-n`` vectors (its build is the
slow part: about 1.5 ms a 2048-d vector on 2 cores at ef_construction=40). Random unit vectors are HNSW's worst
case: in 2048 dimensions every inner product is about 0 +- 0.02, so the "true" top-k is barely separated from the
rest; clustered real descriptors give higher recall at the same settings.

Back-ends are built one after the other (at 1M x 2048 one float32 copy is 8 GB) from the same seeded vectors.
Run: ``python -m bench.search`` (``--quick`` for a smoke test, ``--sizes 100000`` to skip the 1M run).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
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
    unit_vector_blocks,
)
from helpers.builders import make_database

_BYTES_PER_VALUE = {"faiss": 4, "tensor32": 4, "tensor16": 2, "hnsw": 4}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sizes", default="100000,1000000", help="database sizes, comma-separated")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--nq", type=int, default=70, help="queries of the batched search")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=None, help="TensorVectorDB chunk (default: its own)")
    p.add_argument("--backends", default="faiss,tensor32,tensor16,hnsw",
                   help="which of faiss, tensor32, tensor16, hnsw to run (faiss: exact, the reference)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    p.add_argument("--hnsw-ef-construction", type=int, default=40,
                   help="HNSW build candidate list (FaissVectorDB's default is 200; 40 builds 4x faster)")
    p.add_argument("--hnsw-ef-search", default="128,512", help="HNSW search candidate lists, comma-separated")
    p.add_argument("--hnsw-max-n", type=int, default=100000, help="skip HNSW on larger databases (build time)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# The machine's limits
# ----------------------------------------------------------------------------------------------------------------


def read_bandwidth_gbs(*, mb: int = 1024, repeats: int = 3, device: torch.device | None = None) -> dict[str, float]:
    """Achievable read bandwidth of ``device``'s memory (default CPU), GB/s: a float32 sum and a matrix-vector
    product over ``mb`` MB."""
    n = mb * 2**20 // 4
    x = torch.ones(n, device=device)
    mat = x.view(-1, 1024)
    v = torch.ones(1024, device=device)
    out: dict[str, float] = {}
    for name, fn in (("sum", lambda: x.sum()), ("gemv", lambda: mat @ v)):
        fn()
        best = min(time_once(fn, device)[0] for _ in range(repeats))
        out[name] = n * 4 / best / 1e9
    return out


def gemm_gflops(*, size: int = 2048, repeats: int = 3, device: torch.device | None = None) -> float:
    """float32 GEMM rate of ``device`` (default: the CPU's BLAS), GFLOP/s on (size x size) @ (size x size)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = min(time_once(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def lower_bound_s(*, n: int, d: int, nq: int, bytes_per_value: int, bandwidth_gbs: float, gflops: float) -> float:
    """A search cannot beat both reading the database once and doing its multiply-adds at the GEMM rate."""
    return max(n * d * bytes_per_value / (bandwidth_gbs * 1e9), 2 * nq * n * d / (gflops * 1e9))


# ----------------------------------------------------------------------------------------------------------------
# Back-ends
# ----------------------------------------------------------------------------------------------------------------


def build(kind: str, *, n: int, d: int, seed: int, chunk_size: int | None,
          hnsw: dict[str, int] | None = None, device: torch.device | None = None) -> tuple[Any, float, float]:
    """(database, build seconds, index MB) of back-end ``kind`` over the seeded vectors on ``device`` (default
    CPU; faiss searches on that GPU when its build has GPU support, HNSW never: faiss has no GPU HNSW); ``hnsw``
    holds the HNSW index's ``hnsw_m`` and ``ef_construction``."""
    start = time.perf_counter()
    device = device or torch.device("cpu")
    index_mb = n * d * _BYTES_PER_VALUE[kind] / 2**20
    if kind == "faiss":
        db: Any = make_database("faiss", d, index="flat", device=device)
    elif kind == "hnsw":
        db = make_database("faiss", d, index="hnsw", use_gpu=False, **(hnsw or {}))
        index_mb += n * 2 * db.hnsw_m * 4 / 2**20  # the base layer's 2M int32 links a vector (upper layers: ~1/M)
    else:
        dtype = torch.float32 if kind == "tensor32" else torch.float16
        kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
        db = make_database("tensor", d, device=device, dtype=dtype, progress=False, **kwargs)
        db.reserve(n)
    offset = 0
    for block in unit_vector_blocks(n, d, torch.Generator().manual_seed(seed)):
        db.add(block, ids=torch.arange(offset, offset + block.shape[0]))
        offset += block.shape[0]
    return db, time.perf_counter() - start, index_mb


def recall_at_k(ids: torch.Tensor, ref_ids: torch.Tensor) -> float:
    """Mean over queries of |returned top-k & exact top-k| / k."""
    k = ref_ids.shape[1]
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref_ids)) / (k * ref_ids.shape[0])


def searches(built: dict[str, tuple[Any, float, float]], ef_search: Sequence[int]) -> dict[str, tuple[str, Any]]:
    """{row name: (back-end, set-up before each search)}: one row a back-end, one an ``ef_search`` for HNSW."""
    out: dict[str, tuple[str, Any]] = {}
    for kind, (db, _, _) in built.items():
        if kind != "hnsw":
            out[kind] = (kind, None)
            continue
        for ef in ef_search:
            out[f"hnsw ef={ef}"] = (kind, lambda db=db, ef=ef: setattr(db, "ef_search", ef))
    return out


def phases(kinds: Sequence[str], *, n: int, d: int, budget_bytes: float) -> list[list[str]]:
    """Back-ends built together and timed interleaved: all of them when they fit in ``budget_bytes``, else each
    one beside the first (the reference, e.g. faiss), so that every comparison is made under the same load."""
    if sum(_BYTES_PER_VALUE[k] for k in kinds) * n * d <= budget_bytes or len(kinds) < 2:
        return [list(kinds)]
    return [[kinds[0], k] for k in kinds[1:]]


def run_phase(kinds: Sequence[str], *, n: int, d: int, queries: torch.Tensor, args: argparse.Namespace,
              repeats: int, bandwidth_gbs: float, gflops: float, device: torch.device | None = None
              ) -> tuple[list[list], dict[tuple[str, int], float]]:
    """Build ``kinds`` over the same vectors, then time their batched and single-query searches interleaved.

    Returns the table rows and {(kind, nq): median seconds}. Agreement is reported against the first kind.
    """
    hnsw = {"hnsw_m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction}
    built = {kind: build(kind, n=n, d=d, seed=args.seed, chunk_size=args.chunk_size, hnsw=hnsw, device=device)
             for kind in kinds}
    ef_search = [int(e) for e in str(args.hnsw_ef_search).split(",") if e.strip()]
    plan = searches(built, ef_search)
    rows, medians = [], {}
    for nq in sorted({args.nq, 1}, reverse=True):
        xq = queries[:nq]
        results, peaks = {}, {}
        fns = {}
        for name, (kind, prepare) in plan.items():
            db = built[kind][0]

            def search(db=db, prepare=prepare, xq=xq):
                if prepare is not None:
                    prepare()
                return db.search(xq, args.k)

            with PeakRSS() as mem:  # a first search allocates its buffers: its peak is the search's memory
                results[name] = tuple(t.cpu() for t in search())  # compared on the CPU, whatever the device
            peaks[name] = mem.delta_mb
            fns[name] = search
        times = interleaved(fns, repeats=repeats, warmup=0, device=device)
        ref = kinds[0]
        for name, (kind, _) in plan.items():
            _, build_s, index_mb = built[kind]
            t = median(times[name])
            medians[(name, nq)] = t
            bound = lower_bound_s(n=n, d=d, nq=nq, bytes_per_value=_BYTES_PER_VALUE[kind],
                                  bandwidth_gbs=bandwidth_gbs, gflops=gflops)
            agree = ""
            (s_ref, i_ref), (s, i) = results[ref], results[name]
            recall = recall_at_k(i, i_ref)
            t_ref = median(times[ref])
            if kind == "hnsw":  # approximate: its scores are exact for the ids it finds, the ids differ
                agree = f"{t_ref / t:.2f}x as fast as {ref}"
            elif name != ref:
                agree = (f"{(i == i_ref).float().mean().item():.1%} ids, max |ds| "
                         f"{(s - s_ref).abs().max().item():.1e}; {t / t_ref:.2f}x {ref}'s time")
            exhaustive = kind != "hnsw"  # the bound is that of a scan of the whole database; a graph search skips it
            rows.append([n, name, nq, t * 1000, nq / t, bound * 1000 if exhaustive else "-",
                         f"{bound / t:.0%}" if exhaustive else "-", f"{recall:.3f}",
                         peaks[name], index_mb, build_s, agree])
    return rows, medians


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = setup_process(args)
    sizes = [20000] if args.quick else [int(s) for s in args.sizes.split(",")]
    d = 256 if args.quick else args.dim
    repeats = args.repeats or (1 if args.quick else 3)
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    try:
        import faiss  # noqa: F401
    except ImportError:
        skipped = [k for k in ("faiss", "hnsw") if k in kinds]
        if skipped:
            print(f"   faiss is not installed (pip install faiss-cpu): skipping {', '.join(skipped)}")
            kinds = [k for k in kinds if k not in skipped]
    info = machine_info(device)
    print_header(f"Top-{args.k} search, inner product, d={d} (exact; HNSW approximate)", info, {
        "sizes": sizes, "nq": args.nq, "repeats": repeats, "backends": kinds,
        "device": device, "threads (torch = faiss)": torch.get_num_threads(),
        "hnsw": f"M={args.hnsw_m}, ef_construction={args.hnsw_ef_construction}, ef_search={args.hnsw_ef_search}"})

    bw = read_bandwidth_gbs(mb=64 if args.quick else 1024, device=device)
    gflops = gemm_gflops(size=512 if args.quick else 2048, device=device)
    best_bw = max(bw.values())
    print(f"   {device} memory read bandwidth: sum {bw['sum']:.1f} GB/s, gemv {bw['gemv']:.1f} GB/s -> "
          f"{best_bw:.1f} GB/s; float32 GEMM {gflops:.0f} GFLOP/s")

    g = torch.Generator().manual_seed(args.seed + 1000)
    queries = F.normalize(torch.randn(args.nq, d, generator=g), dim=1)
    budget = 0.6 * (meminfo_bytes("MemAvailable") or 8e9)  # 8 GB where unknown
    rows = []
    for n in sizes:
        size_kinds = kinds
        if "hnsw" in kinds and n > args.hnsw_max_n:
            print(f"   n={n}: no HNSW (its build would take too long here; --hnsw-max-n {args.hnsw_max_n})")
            size_kinds = [k for k in kinds if k != "hnsw"]
        for phase in phases(size_kinds, n=n, d=d, budget_bytes=budget):
            phase_rows, _ = run_phase(phase, n=n, d=d, queries=queries, args=args, repeats=repeats,
                                      bandwidth_gbs=best_bw, gflops=gflops, device=device)
            rows += phase_rows
            gc.collect()
    print(format_table(["n", "backend", "nq", "ms/search", "queries/s", "bound ms", "of bound", f"recall@{args.k}",
                        "search extra RSS MB", "index MB", "build s", "agreement (interleaved timing)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
