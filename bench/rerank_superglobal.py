"""SuperGlobal re-ranking (M=400, K=9, beta=0.15), ms per query for 70 queries, 5k and 1M databases.

Two measurements against a per-query loop baseline that makes the release's choices (full sorts where a top-k
suffices, a gathered (M, K+1, d) neighbour tensor per query, a Python loop over queries):

- re-ranking only: each query's top-M ids given; baseline loop vs ``SuperGlobalRerank.rerank_candidates``
  (``models.functional.superglobal_rerank``, vectorised over queries), ``query_chunk`` queries at a time as its
  ``rerank`` does;
- end to end from the database: baseline = the release's evaluation (the full (n, q) similarity matrix in
  float32, a full ``numpy.argsort`` of every column, then the loop) vs ``SuperGlobalRerank.rerank`` over a
  ``TensorVectorDB`` (chunked exact top-M with the candidates' vectors; float16 storage from 100k vectors on,
  so 1M x 2048 takes 4 GB).

Both must return the same ranking. Run: ``python -m bench.rerank_superglobal`` (``--quick``: 5k and 100k).
"""
from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import (
    UNIT_ROWS,
    add_common_args,
    format_table,
    interleaved,
    machine_info,
    median,
    print_header,
    ratio,
    setup_process,
    unit_vector_blocks,
)
from helpers.builders import build_superglobal_reranker, make_database
from models.superglobal import SuperGlobalRerank


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--db-sizes", default=None, help="database sizes (default 5000,1000000; --quick 5000,100000)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--nq", type=int, default=70)
    p.add_argument("--M", type=int, default=400)
    p.add_argument("--K", type=int, default=9)
    p.add_argument("--beta", type=float, default=0.15)
    p.add_argument("--fp16-from", type=int, default=100_000, help="float16 storage from this database size on")
    return p


def make_data(n: int, d: int, nq: int, *, seed: int, fp16_values: bool = False) -> tuple[Tensor, Tensor]:
    """(database (n, d), queries (nq, d)) of unit vectors; each query is a noisy copy of a database vector so
    that its neighbourhood has structure, as a real one does. ``fp16_values``: the database holds float16-exact
    values (float32 storage), so that a float16 index and the float32 baseline see the same vectors."""
    g = torch.Generator().manual_seed(seed)
    xb = torch.empty(n, d)
    start = 0
    for block in unit_vector_blocks(n, d, g):
        xb[start : start + block.shape[0]] = block.half() if fp16_values else block
        start += block.shape[0]
    anchors = torch.randint(0, n, (nq,), generator=g)
    xq = F.normalize(xb[anchors] + 0.8 * torch.randn(nq, d, generator=g) / d**0.5, dim=1)
    return xb, xq


# ----------------------------------------------------------------------------------------------------------------
# Baseline: the release's per-query loop
# ----------------------------------------------------------------------------------------------------------------


def loop_rerank(xq: Tensor, xb: Tensor, top_ids: Tensor, *, K: int, beta: float) -> tuple[Tensor, Tensor]:
    """One query at a time, with full sorts and the gathered neighbour tensor: (scores (q, M), ids (q, M))."""
    scores, ids = [], []
    for i in range(xq.shape[0]):
        cand_ids = top_ids[i]
        cand = xb[cand_ids]  # (M, d)
        sim = cand @ cand.T
        order = torch.argsort(sim, dim=1, descending=True)[:, : K + 1]
        weights = torch.gather(sim, 1, order) * beta
        weights[:, 0] = 1.0
        neighbours = cand[order]  # (M, K+1, d)
        refined = (neighbours * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        s1 = refined @ xq[i]
        top = torch.argsort(s1, descending=True)[: K + 1]
        s2 = refined @ refined[top].amax(0)
        final = (s1 + s2) / 2
        order = torch.argsort(final, descending=True)
        scores.append(final[order])
        ids.append(cand_ids[order])
    return torch.stack(scores), torch.stack(ids)


def release_pipeline(xq: Tensor, xb: Tensor, *, M: int, K: int, beta: float) -> tuple[Tensor, Tensor]:
    """The release's evaluation: full similarity matrix, full numpy argsort per query, then the loop."""
    sim = (xb @ xq.T).numpy()  # (n, q)
    ranks = np.argsort(-sim, axis=0)
    top = torch.from_numpy(np.ascontiguousarray(ranks[:M].T))
    return loop_rerank(xq, xb, top, K=K, beta=beta)


def vectorised(reranker: SuperGlobalRerank, xq: Tensor, candidates: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The library's re-ranking of given candidates (q, M, d) / ids (q, M), in its ``query_chunk``s."""
    chunk = reranker.query_chunk
    out_s, out_i = [], []
    for start in range(0, xq.shape[0], chunk):
        s, i = reranker.rerank_candidates(xq[start : start + chunk], candidates[start : start + chunk],
                                          ids[start : start + chunk])
        out_s.append(s)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


def _on_cpu(ranking: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(scores, ids) copied to the CPU, where they are compared with the loop's."""
    return ranking[0].cpu(), ranking[1].cpu()


def agreement(fast: tuple[Tensor, Tensor], loop: tuple[Tensor, Tensor], tie: float = 1e-6) -> tuple[str, bool]:
    """How far two rankings (scores (q, M), ids (q, M)) agree: identical, or differing only where items whose
    scores are within ``tie`` swapped places (float rounding decides near-ties); the bool says 'same result'.

    Per query: the same ids, each id's score within 1e-5 of the loop's, and the fast order inverts no two ids whose
    loop scores differ by more than ``tie``.
    """
    same = (fast[1] == loop[1]).all(dim=1)
    worst_inversion, per_id, ok = 0.0, 0.0, True
    for i in torch.nonzero(~same).flatten().tolist():
        loop_score = dict(zip(loop[1][i].tolist(), loop[0][i].tolist()))
        if set(loop_score) != set(fast[1][i].tolist()):
            ok = False
            continue
        in_fast_order = torch.tensor([loop_score[j] for j in fast[1][i].tolist()], dtype=torch.float64)
        worst_inversion = max(worst_inversion, float((in_fast_order[1:] - in_fast_order[:-1]).clamp(min=0).max()))
        per_id = max(per_id, float((in_fast_order - fast[0][i].double()).abs().max()))
    diff = max(per_id, (fast[0][same] - loop[0][same]).abs().max().item() if bool(same.any()) else 0.0)
    ok = ok and worst_inversion <= tie and diff <= 1e-5
    text = f"{same.float().mean().item():.0%} identical"
    if not bool(same.all()):
        text += f", others swap near-ties (largest inversion {worst_inversion:.0e})"
    return text + f"; max |d score| {diff:.0e}", ok


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = setup_process(args)
    default_sizes = "5000,100000" if args.quick else "5000,1000000"
    sizes = [int(s) for s in (args.db_sizes or default_sizes).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    nq = min(args.nq, 16) if args.quick else args.nq
    print_header(f"SuperGlobal re-ranking, M={args.M} K={args.K} beta={args.beta}, ms/query", machine_info(device),
                 {"db sizes": sizes, "nq": nq, "d": args.dim, "repeats": repeats,
                  "device": f"{device} (the library's paths; the release's loop on the CPU)"})
    reranker = build_superglobal_reranker(M=args.M, K=args.K, beta=args.beta)
    rows, ok = [], True
    for n in sizes:
        dtype = torch.float16 if n >= args.fp16_from else torch.float32
        xb, xq = make_data(n, args.dim, nq, seed=args.seed, fp16_values=dtype == torch.float16)
        dq = xq.to(device)  # the library's paths run on the device, the release's loop on the CPU
        m = min(args.M, n)
        # ---- re-ranking only (top-M given: the library's exact search of a tensor database)
        cand, dev_top = reranker.candidates(dq, xb, m)
        top = dev_top.cpu()
        times = interleaved({
            "loop": lambda xb=xb, xq=xq, top=top: loop_rerank(xq, xb, top, K=args.K, beta=args.beta),
            "vectorised": lambda dq=dq, cand=cand, t=dev_top: vectorised(reranker, dq, cand, t),
        }, repeats=repeats, warmup=1, device=device)
        loop_s, vec_s = median(times["loop"]), median(times["vectorised"])
        check, good = agreement(_on_cpu(vectorised(reranker, dq, cand, dev_top)),
                                loop_rerank(xq, xb, top, K=args.K, beta=args.beta))
        ok &= good
        rows.append([n, "re-rank only (top-M given)", loop_s / nq * 1000, vec_s / nq * 1000,
                     ratio(loop_s, vec_s), check])
        del cand
        # ---- end to end from the database
        db = make_database("tensor", args.dim, device=device, dtype=dtype, progress=False, norm_tolerance=1e-2)
        db.reserve(n)
        for start in range(0, n, UNIT_ROWS):
            db.add(xb[start : start + UNIT_ROWS], ids=torch.arange(start, min(start + UNIT_ROWS, n)))
        fast = _on_cpu(reranker.rerank(dq, db))  # untimed warm-up; also the result checked below
        times = interleaved({
            "loop": lambda xb=xb, xq=xq, m=m: release_pipeline(xq, xb, M=m, K=args.K, beta=args.beta),
            "fast": lambda db=db, dq=dq, r=reranker: r.rerank(dq, db),
        }, repeats=1 if n > 200_000 else repeats, warmup=0, device=device)
        base, fast_s = median(times["loop"]), median(times["fast"])
        check, good = agreement(fast, release_pipeline(xq, xb, M=m, K=args.K, beta=args.beta))
        ok &= good
        label = f"end to end (TensorVectorDB {str(dtype).removeprefix('torch.')} vs full sort + loop)"
        rows.append([n, label, base / nq * 1000, fast_s / nq * 1000, ratio(base, fast_s), check])
        del db, xb, xq, dq
        gc.collect()
    print(format_table(["n", "stage", "loop ms/query", "fast ms/query", "speed-up", "same result"], rows))
    if not ok:
        print("   FAIL: the fast ranking differs from the loop's beyond near-ties")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
