"""CVNet re-ranking throughput: one query against its top-k candidates, pairs per second.

Baseline (the authors' evaluation): the query's stage-3 map is extracted once, every candidate's map is
extracted again for each pair, and each pair is scored by the faithful path (``CVNetRerank.score``: both
maps reduced by the three 3x3 convs, nine cosine correlations, nine 4D interpolations, the 4D network).

Fast path: the query is extracted, reduced and prepared once; candidates' maps are extracted in same-size
batches, reduced once and kept (a database image's reduced maps do not depend on the query); each size group is
scored in batches by ``CVNetRerank.score_prepared`` (the correlation as two GEMMs that build only what the first
4D conv reads, the 4D network channels-last). Models channels-last, ``inference_mode``.

- cold: the candidates' maps are computed in the run (every candidate new to the cache);
- warm: the maps were cached before (a database image already seen by an earlier query, or cached offline).

Also a profile of one pair by stage, faithful and fast. Random weights (speed does not depend on them).

Run: ``python -m bench.rerank_cvnet`` (``--quick`` for a smoke test, ``--top-k 100`` for the full list).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.common import (
    DTYPES,
    InMemory,
    add_common_args,
    autocast,
    check_equal,
    fast_dtype,
    format_table,
    interleaved,
    machine_info,
    median,
    print_header,
    ratio,
    setup_process,
    synchronize,
    time_once,
)
from common.constants import CVNET_RERANK_TOP_K
from helpers.builders import build_model
from helpers.extraction import ReducedMapStore
from helpers.reranking import CVNetPairScorer
from models import functional as MF
from models.cvnet import CVNetRerank
from models.inference import inference_copy

#: (H, W) of the candidates, cycled: landscape, portrait and a 3:2 image, as in revisited Oxford/Paris.
CANDIDATE_SIZES = ((768, 1024), (1024, 768), (768, 1024), (683, 1024))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--depth", type=int, default=50, choices=(50, 101))
    p.add_argument("--top-k", type=int, default=8,
                   help=f"candidates of the query (the paper re-ranks {CVNET_RERANK_TOP_K})")
    p.add_argument("--baseline-pairs", type=int, default=2, help="pairs timed through the baseline")
    p.add_argument("--query-size", default="768x1024", help="HxW of the query image")
    p.add_argument("--batch-size", type=int, default=2, help="candidates scored together (same map size)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="fast-path compute dtype; float16/bfloat16 need CUDA (autocast)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-stage profile of one pair")
    p.add_argument("--atol", type=float, default=None,
                   help="allowed |fast - faithful| of a score (default: by --dtype, see score_tolerance)")
    return p


#: Allowed |fast - faithful| of a score (a probability in [0, 1]) by the fast path's compute dtype. float32: the
#: two formulations differ by rounding only (~1e-7). Under autocast every convolution and GEMM rounds its inputs
#: to the half dtype (unit roundoff 4.9e-4 for float16, 3.9e-3 for bfloat16); with CPU autocast the scores of
#: the benchmark's random weights moved by 1.1e-4 (float16) and 6.4e-4 (bfloat16) at most
#: (tests/bench/test_fast_paths.py). The tolerances are about four units of roundoff of the dtype.
SCORE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def score_tolerance(dtype: torch.dtype, atol: float | None = None) -> float:
    """``--atol`` when given, else the fast path's tolerance in ``dtype`` (:data:`SCORE_TOLERANCE`)."""
    return SCORE_TOLERANCE[dtype] if atol is None else atol


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def make_images(n: int, sizes: Sequence[tuple[int, int]], *, seed: int, scale: float = 1.0) -> list[Tensor]:
    """``n`` normalised random images (1, 3, H, W), sizes cycled from ``sizes`` (times ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        out.append(torch.randn(1, 3, max(32, int(h * scale)), max(32, int(w * scale)), generator=g))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The two pipelines
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def baseline_scores(model: CVNetRerank, query: Tensor, candidates: Sequence[Tensor], device: torch.device
                    ) -> Tensor:
    """The authors' order: query map once, then per pair: extract the candidate's map, faithful score."""
    qmap = model.extract_featuremap(query.to(device))
    scores = [model.score(qmap, model.extract_featuremap(c.to(device))) for c in candidates]
    return torch.cat(scores).float().cpu()


def single_scale(images: Sequence[Tensor]) -> InMemory:
    """Images (1, 3, H, W) as a dataset of single-scale items, what ``ReducedMapStore`` reads."""
    return InMemory([[img[0]] for img in images])


class FastReranker:
    """The library's fast path: ``ReducedMapStore(fast=True)`` caches of the query's and the candidates' reduced
    maps, and ``CVNetPairScorer(fast=True)`` scoring each size group in batches."""

    def __init__(self, model: CVNetRerank, *, device: torch.device, batch_size: int, dtype: torch.dtype) -> None:
        self.model, self.device, self.batch_size, self.dtype = model, device, batch_size, dtype
        self.db_maps: ReducedMapStore | None = None
        self.query_maps: ReducedMapStore | None = None

    def scores(self, query: Tensor, candidates: Sequence[Tensor], ids: Sequence[int]) -> Tensor:
        """Scores (len(ids),) of the query against candidates ``ids``; their maps are cached across calls, the
        query's are recomputed (a new query each call)."""
        kw = {"model": self.model, "device": self.device, "batch_size": self.batch_size, "fast": True}
        if self.db_maps is None:
            self.db_maps = ReducedMapStore(dataset=single_scale(candidates), **kw)
            self.query_maps = ReducedMapStore(dataset=single_scale([query]), **kw)
        self.query_maps.clear()
        scorer = CVNetPairScorer(model=self.model, query_maps=self.query_maps, db_maps=self.db_maps,
                                 batch_size=self.batch_size, progress=False, fast=True)
        with autocast(self.device, self.dtype):
            return torch.from_numpy(scorer(np.array([(0, i) for i in ids]).reshape(-1, 2))).float()


# ----------------------------------------------------------------------------------------------------------------
# Profile of one pair by stage
# ----------------------------------------------------------------------------------------------------------------


def _stage(rows: list, name: str, fn: Callable[[], Any], device: torch.device, repeats: int) -> Any:
    time_once(fn, device)  # untimed: lazy initialisation and kernel creation for these shapes
    ts, out = [], None
    for _ in range(repeats):
        t, out = time_once(fn, device)
        ts.append(t)
    rows.append([name, median(ts) * 1000])
    return out


@torch.inference_mode()
def profile_faithful(model: CVNetRerank, q_img: Tensor, k_img: Tensor, device: torch.device, repeats: int
                     ) -> list[list]:
    rows: list[list] = []
    qm = _stage(rows, "feature map (stage 3), per image", lambda: model.extract_featuremap(q_img), device, repeats)
    km = model.extract_featuremap(k_img)
    q, k = _stage(rows, "reduce convs (3 x 3x3 1024->256), both maps",
                  lambda: (model.reduce_featuremap(qm), model.reduce_featuremap(km)), device, repeats)
    size = (*q[-1].shape[-2:], *k[-1].shape[-2:])
    cos = _stage(rows, "cosine correlations (9)",
                 lambda: [MF.cosine_correlation(a, b) for a in q for b in k], device, repeats)
    up = _stage(rows, "4D interpolation (9)", lambda: [MF.interpolate_4d(c, size) for c in cos], device, repeats)
    corr = _stage(rows, "stack + clamp", lambda: torch.stack(up, dim=1).clamp(min=0), device, repeats)
    learner = model.cv_learner
    x1 = _stage(rows, "CVLearner block 1", lambda: learner.block1(corr), device, repeats)
    x4 = _stage(rows, "CVLearner blocks 2-4", lambda: learner.block4(learner.block3(learner.block2(x1))),
                device, repeats)
    _stage(rows, "mean + MLP + softmax", lambda: torch.softmax(learner.mlp(x4.flatten(2).mean(-1)), 1)[:, 1],
           device, repeats)
    return rows


@torch.inference_mode()
def profile_fast(fast: FastReranker, q_img: Tensor, k_img: Tensor, device: torch.device, repeats: int
                 ) -> list[list]:
    """The fast path's stages, each under the fast path's autocast (``fast.dtype``), as :meth:`FastReranker.scores`
    runs them."""
    with autocast(device, fast.dtype):
        return _profile_fast(fast, q_img, k_img, device, repeats)


def _profile_fast(fast: FastReranker, q_img: Tensor, k_img: Tensor, device: torch.device, repeats: int
                  ) -> list[list]:
    model = inference_copy(fast.model)  # what ReducedMapStore(fast=True) extracts with
    rows: list[list] = []
    q_img = q_img.to(device).contiguous(memory_format=torch.channels_last)
    k_img = k_img.to(device).contiguous(memory_format=torch.channels_last)
    qm = _stage(rows, "feature map (stage 3), per image", lambda: model.extract_featuremap(q_img), device, repeats)
    km = model.extract_featuremap(k_img)
    q = _stage(rows, "reduce convs, query only (database maps cached)", lambda: model.reduce_featuremap(qm),
               device, repeats)
    k = model.reduce_featuremap(km)
    qp, kp = _stage(rows, "normalise + 2D upsample, both", lambda: (model.prepare_reduced(q),
                                                                   model.prepare_reduced(k)), device, repeats)
    learner = model.cv_learner
    first = learner.block1[0]
    by_key, by_query = _stage(rows, "correlation slices (2 GEMMs + clamp)",
                              lambda: MF.pivot_correlations(qp, kp, first.stride), device, repeats)

    def block1() -> Tensor:
        x = MF.center_pivot_conv4d_slices(by_key, by_query, first.conv1.weight, first.conv1.bias,
                                          first.conv2.weight, first.conv2.bias, first.stride, first.padding)
        return model.run_channels_last(x, list(learner.block1)[1:])

    x1 = _stage(rows, "CVLearner block 1", block1, device, repeats)

    def rest() -> Tensor:
        x = x1.clone()  # the layers work in place on their own outputs only, but keep x1 for the next repeat
        for block in (learner.block2, learner.block3, learner.block4):
            x = model.run_channels_last(x, list(block))
        return x

    x4 = _stage(rows, "CVLearner blocks 2-4", rest, device, repeats)
    _stage(rows, "mean + MLP + softmax", lambda: model.head_channels_last(x4), device, repeats)
    return rows


# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = setup_process(args)
    dtype = fast_dtype(args.dtype, device)
    scale = 0.2 if args.quick else 1.0
    top_k = min(args.top_k, 4) if args.quick else args.top_k
    n_base = max(1, min(args.baseline_pairs, top_k, 2 if args.quick else args.baseline_pairs))
    repeats = args.repeats or (1 if args.quick else 2)
    qh, qw = parse_size(args.query_size)

    # seed=None: random weights from the global RNG that setup_process seeded (speed does not depend on them)
    model = build_model("cvnet_rerank", depth=args.depth, seed=None, device=device, warn_random=False)
    query = make_images(1, [(qh, qw)], seed=args.seed, scale=scale)[0]
    candidates = make_images(top_k, CANDIDATE_SIZES, seed=args.seed + 1, scale=scale)
    print_header("CVNet re-ranking: one query against its top-k, pairs/s", machine_info(device), {
        "depth": args.depth, "query": "x".join(map(str, query.shape[-2:])),
        "candidates": f"{top_k} of sizes {sorted({tuple(c.shape[-2:]) for c in candidates})}",
        "baseline_pairs": n_base, "batch_size": args.batch_size, "dtype": args.dtype, "repeats": repeats})

    fast = FastReranker(model, device=device, batch_size=args.batch_size, dtype=dtype)
    ids = list(range(top_k))
    base_ids = ids[:n_base]

    def run_cold() -> Tensor:
        if fast.db_maps is not None:
            fast.db_maps.clear()  # an empty cache: every candidate's map extracted in the run
        return fast.scores(query, candidates, ids)

    # warm-up both paths (oneDNN builds kernels per shape), then interleave the timed runs
    times = interleaved({
        "baseline": lambda: baseline_scores(model, query, [candidates[i] for i in base_ids], device),
        "cold": run_cold,
        "warm": lambda: fast.scores(query, candidates, ids),
    }, repeats=repeats, warmup=1, device=device)
    base_s = median(times["baseline"]) / n_base
    cold_s = median(times["cold"]) / top_k
    warm_s = median(times["warm"]) / top_k
    rows = [
        ["baseline (re-extract per pair, faithful score)", n_base, 1 / base_s, base_s * 1000, "1.00x"],
        ["fast, cold cache (maps extracted once, batched)", top_k, 1 / cold_s, cold_s * 1000, ratio(base_s, cold_s)],
        ["fast, warm cache (database maps cached)", top_k, 1 / warm_s, warm_s * 1000, ratio(base_s, warm_s)],
    ]
    print(format_table(["path", "pairs", "pairs/s", "ms/pair", "speed-up"], rows))

    ok = check_equal("scores", fast.scores(query, candidates, base_ids),
                     baseline_scores(model, query, [candidates[i] for i in base_ids], device),
                     score_tolerance(dtype, args.atol))

    if not args.no_profile:
        q_img, k_img = query.to(device), candidates[0].to(device)
        faithful = profile_faithful(model, q_img, k_img, device, repeats)
        fastp = profile_fast(fast, q_img, k_img, device, repeats)
        print(f"\n   profile of one {q_img.shape[-2]}x{q_img.shape[-1]} pair, ms (median of {repeats})")
        print("   faithful path (the authors' order of operations):")
        print(format_table(["stage", "ms"], faithful))
        print("   fast path:")
        print(format_table(["stage", "ms"], fastp))
        print(f"   one pair: faithful {sum(r[1] for r in faithful):.0f} ms (the key's map re-extracted, the query's "
              f"amortised); fast cold {sum(r[1] for r in fastp):.0f} ms (the key's map extracted and reduced "
              f"once); fast warm {sum(r[1] for r in fastp[2:]):.0f} ms (maps cached)")
    synchronize(device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
