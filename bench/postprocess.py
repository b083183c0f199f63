"""The standard post-processing of a global ranking (alpha-QE, alpha-DBA, k-reciprocal, learned PCA whitening)
timed against the global search itself.

Two measurements, on seeded random unit vectors:

- **full mode** (``--n`` 5000 x ``--dim`` 2048, ``--nq`` 70, the revisited Oxford/Paris sizes): each step of
  :mod:`models.functional` alone (alpha-QE of the queries, the k-reciprocal distance over the whole pool and,
  as its floor, the pool's distances alone, whitening applied to the queries; then the database-side work,
  paid once per database: alpha-DBA, learning the whitening, whitening the database) and
  :func:`helpers.postprocess.postprocess_ranking` with each step switched on (database side included, as eval.py
  runs it), interleaved with the exact top-k search by inner product over the same database (``TensorVectorDB``,
  float32), which is the reference: each step's time is reported as a multiple of it. Also each step's peak
  extra memory (its first, untimed call).
- **shortlist mode** (``--large-n``, default 1M; float16 storage): the exact top-``--shortlist`` search over the
  large database, then ``postprocess_ranking`` of each query's shortlist read back from the store, per query
  (ms/query) with its peak extra memory: bounded by the shortlist, not by the database size.

Run: ``python -m bench.postprocess`` (``--quick`` for a smoke test in seconds).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

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
    unit_vector_blocks,
    unit_vectors,
)
from helpers.postprocess import PostProcessing, postprocess_ranking
from helpers.vector_db.tensor import TensorVectorDB
from models import functional as MF


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--n", type=int, default=5000, help="database size of the full-mode measurement")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--nq", type=int, default=70)
    p.add_argument("--k", type=int, default=100, help="top-k of the global search")
    p.add_argument("--aqe-k", type=int, default=2)
    p.add_argument("--dba-k", type=int, default=2)
    p.add_argument("--alpha", type=float, default=3.0, help="alpha of alpha-QE and alpha-DBA")
    p.add_argument("--large-n", type=int, default=1_000_000,
                   help="database size of the shortlist-mode measurement (0: skip it); lowered to what fits")
    p.add_argument("--shortlist", type=int, default=1000, help="candidates per query in shortlist mode")
    return p


def settings(aqe_k: int, dba_k: int, alpha: float, shortlist: int = 1000) -> dict[str, PostProcessing]:
    """The post-processing configurations timed through ``postprocess_ranking``: each step alone, then all."""
    base = {"aqe_alpha": alpha, "dba_alpha": alpha, "shortlist": shortlist}
    return {
        "α-QE": PostProcessing(aqe_k=aqe_k, **base),
        "α-DBA": PostProcessing(dba_k=dba_k, **base),
        "k-reciprocal": PostProcessing(kreciprocal=True, **base),
        "α-DBA + α-QE + k-reciprocal": PostProcessing(aqe_k=aqe_k, dba_k=dba_k, kreciprocal=True, **base),
    }


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the kernel (glibc), so that the next peak-RSS reading starts from what is
    really in use rather than from earlier steps' freed buffers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _on_cpu(result: Any) -> Any:
    """A step's result with its tensors (alone or in a tuple) copied to the CPU; anything else as it is."""
    if isinstance(result, tuple):
        return tuple(_on_cpu(r) for r in result)
    if isinstance(result, dict):
        return {k: _on_cpu(v) for k, v in result.items()}
    return result.cpu() if isinstance(result, torch.Tensor) else result


def _measure(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device | None = None
             ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """(median seconds, peak extra MB of the first call, result of the first call, on the CPU) of each function;
    the first calls are untimed, then ``repeats`` interleaved rounds (waiting for ``device``'s kernels)."""
    results, peaks = {}, {}
    for name, fn in fns.items():
        _release_freed_memory()
        with PeakRSS() as mem:
            results[name] = _on_cpu(fn())
        peaks[name] = mem.delta_mb
    times = interleaved(fns, repeats=repeats, warmup=0, device=device)
    return {name: median(ts) for name, ts in times.items()}, peaks, results


def measure_full(*, n: int, d: int, nq: int, k: int, aqe_k: int, dba_k: int, alpha: float, seed: int,
                 repeats: int, device: torch.device | None = None) -> dict[str, Any]:
    """Full mode: every step and ``postprocess_ranking`` with each, interleaved with the global search. The
    search and the steps run on ``device`` (default CPU); ``postprocess_ranking``, a CPU function of the
    evaluation, on the CPU.

    Returns ``{"xq", "xb", "ranks" (n, nq) global ranking, "seconds", "peak_mb", "results"}`` where ``results``
    holds each timed function's output: ``"global search"`` (scores, ids) (nq, k), ``"global ranking"`` (n, nq)
    the whole database ordered, ``"α-QE"`` (nq, d) expanded queries, ``"α-DBA"`` (n, d) augmented database,
    ``"k-reciprocal"`` (nq, n) distances, ``"k-reciprocal's pool distances"`` the (nq + n, nq + n) squared
    distances every k-reciprocal call needs (its floor), ``"whitening: learn"`` the learned whitening,
    ``"whitening: apply to queries"`` / ``"... database"`` the whitened vectors, and ``"ranking: <setting>"``
    (n, nq) post-processed ranks.
    """
    xb = unit_vectors(n, d, seed=seed)
    xq = unit_vectors(nq, d, seed=seed + 1)
    ranks = torch.argsort(xq @ xb.T, dim=1, descending=True, stable=True).T.numpy()  # what eval's ranking gives
    dq, db_x = xq.to(device), xb.to(device)  # the steps' inputs on the measured device
    db = TensorVectorDB(d, device=db_x.device)
    db.add(db_x)

    whitening = MF.learn_pca_whitening(db_x)
    pool = torch.cat([dq, db_x])

    fns: dict[str, Callable[[], Any]] = {
        "global search": lambda: db.search(dq, k),
        "global ranking": lambda: torch.argsort(dq @ db_x.T, dim=1, descending=True, stable=True).T.cpu().numpy(),
        "α-QE": lambda: MF.alpha_query_expansion(dq, db_x, k=aqe_k, alpha=alpha),
        "k-reciprocal": lambda: MF.k_reciprocal_distance(dq, db_x),
        "k-reciprocal's pool distances": lambda: MF.pairwise_squared_distances(pool),
        "whitening: apply to queries": lambda: MF.apply_whitening(dq, whitening),
        "α-DBA": lambda: MF.database_side_augmentation(db_x, k=dba_k, alpha=alpha),
        "whitening: learn": lambda: MF.learn_pca_whitening(db_x),
        "whitening: apply to database": lambda: MF.apply_whitening(db_x, whitening),
    }
    for name, post in settings(aqe_k, dba_k, alpha).items():
        fns[f"ranking: {name}"] = lambda post=post: postprocess_ranking(xq, xb, ranks, post)
    seconds, peaks, results = _measure(fns, repeats, device)
    return {"xq": xq, "xb": xb, "ranks": ranks, "seconds": seconds, "peak_mb": peaks, "results": results}


def fitting_size(requested: int, d: int, *, bytes_per_value: int = 2, share: float = 0.5) -> int:
    """The largest of ``requested``, 500k, 200k, 100k, ... whose store takes at most ``share`` of the available
    memory (the machine may be shared)."""
    available = meminfo_bytes("MemAvailable") or 8e9
    n = requested
    for candidate in (requested, 500_000, 200_000, 100_000, 50_000, 20_000):
        n = min(requested, candidate)
        if n * d * bytes_per_value <= share * available:
            break
    return n


def measure_shortlist(*, n: int, d: int, nq: int, shortlist: int, aqe_k: int, dba_k: int, alpha: float,
                      seed: int, repeats: int, device: torch.device | None = None) -> dict[str, Any]:
    """Shortlist mode over a float16 store of ``n`` vectors on ``device`` (default CPU): the exact
    top-``shortlist`` search, then ``postprocess_ranking`` (on the CPU) of those candidates (read back from the
    store) with each setting.

    Returns ``{"seconds", "peak_mb", "results", "store_mb", "n"}``; ``results["global search"]`` is (scores, ids)
    (nq, shortlist), ``results[<setting>]`` the re-ordered (shortlist, nq) ids.
    """
    db = TensorVectorDB(d, device=device or "cpu", dtype=torch.float16, progress=False)
    db.reserve(n)
    offset = 0
    for block in unit_vector_blocks(n, d, torch.Generator().manual_seed(seed)):
        db.add(block, ids=torch.arange(offset, offset + block.shape[0]))
        offset += block.shape[0]
    xq = unit_vectors(nq, d, seed=seed + 1)
    _, top = db.search(xq, shortlist)
    ranks = top.T.cpu().numpy()

    fns: dict[str, Callable[[], Any]] = {"global search": lambda: db.search(xq, shortlist)}
    for name, post in settings(aqe_k, dba_k, alpha, shortlist=shortlist).items():
        fns[name] = lambda post=post: postprocess_ranking(xq, None, ranks, post,
                                                          gather=lambda rows: db.get(rows).cpu())
    seconds, peaks, results = _measure(fns, repeats, device)
    return {"seconds": seconds, "peak_mb": peaks, "results": results, "n": n,
            "store_mb": n * d * 2 / 2**20}


_QUERY_SIDE, _DATABASE_SIDE = "per query batch", "once per database"
_NOTES = {
    "global search": (_QUERY_SIDE, "the reference: exact top-k, queries against the database"),
    "global ranking": (_QUERY_SIDE, "every database vector ordered, as eval.py's ranking (the 'ranking:' rows)"),
    "α-QE": (_QUERY_SIDE, "top-k search + weighted sum; re-ranking then needs one more search"),
    "k-reciprocal": (_QUERY_SIDE, "one pool of queries and database, as the authors' function"),
    "k-reciprocal's pool distances": (_QUERY_SIDE, "k-reciprocal's floor: its pool's (nq + n)^2 distances"),
    "whitening: apply to queries": (_QUERY_SIDE, "L2((x - m) P), d x d"),
    "α-DBA": (_DATABASE_SIDE, "top-k of every database vector: n^2 d"),
    "whitening: learn": (_DATABASE_SIDE, "once per training set: d x d covariance, eigh (float64)"),
    "whitening: apply to database": (_DATABASE_SIDE, "L2((x - m) P) of every database vector"),
}


def full_rows(out: dict[str, Any]) -> list[list[Any]]:
    """Table rows: query-batch costs first, then database-side ones, then whole rankings."""
    ref = out["seconds"]["global search"]
    default = (_QUERY_SIDE, "postprocess_ranking, full mode, as eval.py runs it (database side included)")
    order = sorted(out["seconds"], key=lambda name: (name.startswith("ranking: "),
                                                     _NOTES.get(name, default)[0] == _DATABASE_SIDE))
    rows = []
    for name in order:
        t = out["seconds"][name]
        paid, note = _NOTES.get(name, default)
        rows.append([name, paid, t * 1000, f"{t / ref:.2f}x", out["peak_mb"][name], note])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = setup_process(args)
    if args.quick:
        args.n, args.dim, args.nq = min(args.n, 1000), min(args.dim, 256), min(args.nq, 20)
        args.large_n = min(args.large_n, 100_000)
        args.shortlist = min(args.shortlist, 200)
    repeats = args.repeats or (1 if args.quick else 3)
    info = machine_info(device)
    print_header(f"Post-processing of a global ranking against the global search, {device}", info, {
        "n": args.n, "d": args.dim, "nq": args.nq, "k": args.k, "α-QE k": args.aqe_k, "α-DBA k": args.dba_k,
        "α": args.alpha, "k-reciprocal": "k1=20 k2=6 λ=0.3", "repeats": repeats})

    full = measure_full(n=args.n, d=args.dim, nq=args.nq, k=args.k, aqe_k=args.aqe_k, dba_k=args.dba_k,
                        alpha=args.alpha, seed=args.seed, repeats=repeats, device=device)
    print(f"\n-- full mode: {args.n} x {args.dim} float32 database, {args.nq} queries (median of {repeats}, "
          "interleaved)")
    print(format_table(["step", "paid", "ms", "x global search", "peak extra MB (first call)", "what"],
                       full_rows(full)))

    if args.large_n > 0:
        n = fitting_size(args.large_n, args.dim)
        if n < args.large_n:
            print(f"\n   {args.large_n} x {args.dim} float16 does not fit in half the available memory: using {n}")
        large_repeats = 1 if not args.repeats else args.repeats
        short = measure_shortlist(n=n, d=args.dim, nq=args.nq, shortlist=args.shortlist, aqe_k=args.aqe_k,
                                  dba_k=args.dba_k, alpha=args.alpha, seed=args.seed, repeats=large_repeats,
                                  device=device)
        print(f"\n-- shortlist mode: {n} x {args.dim} float16 store ({short['store_mb']:.0f} MB), {args.nq} "
              f"queries, top {args.shortlist} each (median of {large_repeats})")
        ref = short["seconds"]["global search"]
        rows = [[name, t * 1000 / args.nq, f"{t / ref:.2f}x", short["peak_mb"][name]]
                for name, t in short["seconds"].items()]
        print(format_table(["step", "ms/query", "x global search", "peak extra MB (first call)"], rows))
        pool = (args.nq + n) ** 2 * 4 / 2**30
        print(f"   full mode here would hold (nq + n)^2 float32 = {pool:,.0f} GB per pool matrix for k-reciprocal; "
              f"shortlist mode holds O(shortlist^2 + shortlist x d) a query")
    return 0


if __name__ == "__main__":
    sys.exit(main())
