"""The evaluation run behind ``eval.py``: datasets, weights, models, global descriptors, rankings, re-ranking and
the revisited metrics, for every (dataset, method) of a checked config.

    cfg = load_config("configs/eval_builtin.yaml", schema=EVAL)
    outcome = run_evaluation(cfg, env=init_distributed(cfg["device"]))
    outcome.results["synth"]["cvnet_rerank"]["mAP"]["hard"]  # percent

Methods: ``cvnet_global``, ``cvnet_rerank`` (CVNet-Global ranking re-ranked by CVNet-Rerank), ``superglobal``,
``superglobal_rerank``. The models the methods need are built once and their descriptors shared. Under torchrun
every rank extracts its shards of the descriptors; rank 0 alone ranks and scores.

Beside the methods' rows: ``post.rows`` adds post-processed copies of each global ranking (helpers.evaluation.post),
and ``export.ames`` writes the SuperGlobal shortlists and descriptors that AMES and LoCoRe read
(helpers.evaluation.export).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.constants import CVNET_SCORE_WEIGHT
from common.timing import timed
from datasets.revisited import RevisitedDataset
from helpers.builders import (
    GLOBAL_KINDS,
    build_superglobal_reranker,
    global_dim,
)
from helpers.cache_keys import state_dict_hash
from helpers.config import ConfigError
from helpers.distributed import DistEnv
from helpers.evaluation.data import (
    CombinedReader,
    build_builtin_dataset,
    dataset_label,
    open_distractors,
    open_revisited,
    stored_distractors,
)
from helpers.evaluation.detail import (
    SCORE_SOURCES,
    MethodDetail,
    RankingDetail,
    RecordingReranker,
    ScoreFn,
    global_detail,
    global_scores,
    lookup_scores,
    ranking_detail,
)
from helpers.evaluation.export import check_exports, export_ames
from helpers.evaluation.metrics import PROTOCOLS, evaluate_revisited, format_percent, metrics_percent
from helpers.evaluation.models import (
    METHOD_BASE,
    SEED_OFFSETS,
    WeightsPlan,
    build_models,
    needed_models,
    plan_weights,
    scales_for,
    verify_weights,
)
from helpers.evaluation.post import (
    WhiteningContext,
    check_whitening_source,
    obtain_whitening,
    post_rows,
    post_score_source,
    rank_post_row,
    row_order,
    whitened_ranking,
)
from helpers.evaluation.rerank import run_cvnet_rerank, superglobal_database
from helpers.extraction import cached_global_descriptors
from helpers.reranking import (
    global_ranking,
    superglobal_rerank_ranking,
)

logger = logging.getLogger(__name__)


class Timer:
    """Wall time per named stage (seconds, summed over repeats)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the ``with`` block as stage ``name`` (logged)."""
        return timed(self.stages, name, logger=logger)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Weights and models
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Re-ranking
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Post-processed rows and exports
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    """What a run found: ``results[label][row]`` (percent, :func:`helpers.evaluation.metrics_percent`) for each
    method and post-processed row, the Medium ranking (n_db, nq) behind each, the weights plan (and the sha256 of
    each weights file), stage timings, the datasets opened, per (label, row) the per-query :class:`MethodDetail`,
    the rows in report order (``rows``), what each post-processed row applied (``post``) and the files
    exported (``exports``)."""

    results: dict[str, dict[str, Any]]
    rankings: dict[tuple[str, str], np.ndarray]
    plan: WeightsPlan
    timer: Timer
    data: dict[str, dict[str, Any]]
    names: list[str]
    builtin: bool
    distractors: str | None
    root: str = ""
    min_side: int | None = None
    details: dict[tuple[str, str], MethodDetail] = field(default_factory=dict)
    rows: list[str] = field(default_factory=list)
    post: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights_sha256: dict[str, str] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)
    _readers: dict[str, CombinedReader] = field(default_factory=dict, repr=False)

    def query_set(self, label: str) -> RevisitedDataset:
        return self.data[label.removesuffix("+1m")]["query_set"]

    def db_reader(self, label: str) -> CombinedReader:
        """Images of the ranked items of ``label``: the database, then the distractors for a ``+1m`` label (their
        list of a million names is read once)."""
        if label not in self._readers:
            db = self.data[label.removesuffix("+1m")]["db_set"]
            extra = None
            if label.endswith("+1m"):
                extra = open_distractors(root=self.root, convention=db.convention, scales=(1.0,),
                                         min_side=self.min_side)
            self._readers[label] = CombinedReader(db, extra)
        return self._readers[label]


def run_evaluation(cfg: Mapping[str, Any], *, env: DistEnv | None = None) -> EvalOutcome | None:
    """Evaluate every (dataset, method) and post-processed row of the checked config ``cfg`` (see
    helpers.schemas.EVAL) on ``env.device``; returns the outcome on rank 0, None on the other ranks."""
    env = env or DistEnv()
    timer = Timer()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    data_cfg, model_cfg, ext_cfg = cfg["data"], cfg["model"], cfg["extraction"]
    methods = list(cfg["methods"])
    if not methods:
        raise ConfigError("methods is empty")
    needed = needed_models(methods)
    check_exports(cfg, needed)
    progress = bool(cfg.get("progress", True)) and env.is_main
    device = env.device
    depth = int(model_cfg["depth"])
    root = os.fspath(data_cfg["root"])
    min_side = data_cfg.get("min_side")
    distractors = data_cfg.get("distractors")
    names = list(data_cfg["datasets"])
    builtin = bool((data_cfg.get("synthetic") or {}).get("name"))
    # the global rankings the run computes; the post-processed rows are copies of each
    global_kinds = sorted(needed & set(GLOBAL_KINDS))
    post_cfg = cfg.get("post") or {"rows": []}
    rows = post_rows(post_cfg, kinds=global_kinds) if post_cfg.get("rows") else []
    white_cfg = post_cfg.get("whitening") or {}
    if any(r.whitening for r in rows):
        check_whitening_source(white_cfg.get("source"))
    if builtin:
        with timer.stage("build synthetic dataset"):
            names = [build_builtin_dataset(root=root, synthetic=data_cfg["synthetic"], progress=progress)]
    if not names:
        raise ConfigError("data.datasets is empty")

    plan = plan_weights(model_cfg)
    weights_sha256 = verify_weights(plan, model_cfg.get("weights_sha256"))
    with timer.stage("build models"):
        models = build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=int(cfg.get("seed", 0)),
                              device=device)
        hashes = {k: state_dict_hash(m) for k, m in models.items()}
    run_flip = bool(ext_cfg.get("flip", False))  # every ranking of the run from flip-averaged descriptors
    # where each model's weights came from, for the engine's errors (NaN descriptors, too-small images)
    sources = {k: plan.global_path or f"random (seed {int(cfg.get('seed', 0)) * 1000 + SEED_OFFSETS[k]})"
               for k in models}
    if "timm_global" in models:
        sources["timm_global"] = (model_cfg.get("timm") or {}).get("weights") or \
            f"random (seed {int(cfg.get('seed', 0)) * 1000 + SEED_OFFSETS['timm_global']})"
    extract_kw = {"device": device, "batch_size": int(ext_cfg["batch_size"]),
                  "num_workers": int(ext_cfg["num_workers"]), "shard_size": ext_cfg.get("shard_size"),
                  "rank": env.rank, "world_size": env.world_size, "progress": progress,
                  "cache_dir": ext_cfg.get("cache_dir")}

    # phase 1, every rank: global descriptors (queries, database, distractors) per dataset and model
    data: dict[str, dict[str, Any]] = {}
    checked_r1m = False
    for name in names:
        entry: dict[str, Any] = {"vectors": {}}
        for kind in global_kinds:
            model = models[kind]
            conv, scales = model.input_convention, scales_for(kind, model_cfg)
            sets = {split: open_revisited(root=root, name=name, split=split, convention=conv, scales=scales,
                                          min_side=min_side) for split in ("query", "db")}
            entry.setdefault("query_set", sets["query"])
            entry.setdefault("db_set", sets["db"])
            for split, ds in sets.items():
                with timer.stage(f"extract {kind} {name} {split}"):
                    entry["vectors"][(kind, split)] = cached_global_descriptors(
                        model=model, dataset=ds, label=f"{name}-{split}-{kind}-r{depth}",
                        weights_hash=hashes[kind], weights_source=sources[kind], flip=run_flip, **extract_kw)
            if distractors:
                with timer.stage(f"extract {kind} revisitop1m"):
                    # the completeness scan of the 1M files runs once per run, not once per model
                    r1m = open_distractors(root=root, convention=conv, scales=scales, min_side=min_side,
                                           progress=progress, check=not checked_r1m)
                    checked_r1m = True
                    vectors = cached_global_descriptors(
                        model=model, dataset=r1m, label=f"revisitop1m-{kind}-r{depth}",
                        weights_hash=hashes[kind], weights_source=sources[kind], flip=run_flip, **extract_kw)
                    entry["vectors"][(kind, "distractors")] = stored_distractors(vectors,
                                                                                 data_cfg["distractors_dtype"])
            if any(r.flip and r.base == kind for r in rows) and not run_flip:
                # the flip rows' descriptors: original and mirrored image averaged (a second extraction)
                for split, ds in sets.items():
                    with timer.stage(f"extract {kind} {name} {split} (flip)"):
                        entry["vectors"][(kind, split, "flip")] = cached_global_descriptors(
                            model=model, dataset=ds, label=f"{name}-{split}-{kind}-r{depth}-flip",
                            weights_hash=hashes[kind], weights_source=sources[kind], flip=True, **extract_kw)
                if distractors:
                    with timer.stage(f"extract {kind} revisitop1m (flip)"):
                        vectors = cached_global_descriptors(
                            model=model, dataset=r1m, label=f"revisitop1m-{kind}-r{depth}-flip",
                            weights_hash=hashes[kind], weights_source=sources[kind], flip=True, **extract_kw)
                        entry["vectors"][(kind, "distractors", "flip")] = stored_distractors(
                            vectors, data_cfg["distractors_dtype"])
        data[name] = entry
    whitenings: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {}
    if any(r.whitening for r in rows):
        ctx = WhiteningContext(
            source=white_cfg.get("source"), dim=white_cfg.get("dim"), max_images=white_cfg.get("images"),
            weights_file=plan.global_path,
            weights_sha256=weights_sha256.get(plan.global_path or ""), root=root,
            train_name=data_cfg["synthetic"]["name"] if builtin else None, min_side=min_side,
            cache_dir=ext_cfg.get("cache_dir"), depth=depth, extract_kw=extract_kw)
        for kind in sorted({r.base for r in rows if r.whitening}):
            with timer.stage(f"whitening {kind}"):
                whitenings[kind] = obtain_whitening(
                    ctx, kind=kind, model=models[kind], state_hash=hashes[kind],
                    d=global_dim(models[kind]), scales=scales_for(kind, model_cfg),
                    is_main=env.is_main)
    if not env.is_main:
        logger.info("rank %d: extraction done; rank 0 evaluates", env.rank)
        return None

    # phase 2, rank 0: rankings, re-ranking, metrics
    kappas = [int(k) for k in cfg["eval"]["kappas"]]
    rr_cfg = cfg["rerank"]
    top = int(cfg["viz"]["top"])
    export_cfg = cfg.get("export") or {}
    results: dict[str, dict[str, Any]] = {}
    rankings: dict[tuple[str, str], np.ndarray] = {}
    details: dict[tuple[str, str], MethodDetail] = {}
    exports: dict[str, Any] = {}
    for name in names:
        entry = data[name]
        gnd = entry["query_set"].gnd
        # (kind, split) -> whitened descriptors, shared by the dataset's labels (plain and +1M)
        whitened: dict[tuple[str, str], torch.Tensor] = {}
        whitened_flip: dict[tuple[str, str], torch.Tensor] = {}
        for extra in [None] + ([distractors] if distractors else []):
            label = dataset_label(name, extra)
            results[label] = {}
            ranked: dict[str, tuple[np.ndarray, Any, Any]] = {}
            global_details: dict[str, RankingDetail] = {}
            detail_kw = {"ranked": ranked, "gnd": gnd, "kappas": kappas, "top": top, "cache": global_details}
            sg_rerank: tuple[np.ndarray, ScoreFn, int] | None = None
            for kind in global_kinds:
                xq = entry["vectors"][(kind, "query")]
                xb: Any = entry["vectors"][(kind, "db")]
                if extra:  # the database then the distractors, never concatenated (+1M: 8 GB per copy)
                    xb = [xb, entry["vectors"][(kind, "distractors")]]
                with timer.stage(f"rank {kind} {label}"):
                    _, ranks = global_ranking(xq, xb, device=device, with_similarities=False, rank_dtype=np.int32)
                ranked[kind] = (ranks, xq, xb)
            for method in methods:
                base = METHOD_BASE[method]
                ranks, xq, xb = ranked[base]
                score_of: Any = None
                if method in GLOBAL_KINDS:
                    final: Any = ranks
                elif method == "cvnet_rerank":
                    with timer.stage(f"cvnet_rerank {label}"):
                        final, mixed = run_cvnet_rerank(
                            model=models["cvnet_rerank"], root=root, name=name, extra=extra, min_side=min_side,
                            rr=rr_cfg["cvnet"], ext_cfg=ext_cfg, ranks=ranks, xq=xq, xb=xb, gnd=gnd,
                            device=device, weights_hash=hashes["cvnet_rerank"], progress=progress)
                    score_of = lookup_scores(mixed)
                else:
                    with timer.stage(f"superglobal_rerank {label}"):
                        sgr = rr_cfg["superglobal"]
                        reranker = RecordingReranker(build_superglobal_reranker(M=sgr["M"], K=sgr["K"],
                                                                                beta=sgr["beta"]))
                        database = superglobal_database(xb, kind=sgr.get("database", "tensor"), device=device)
                        final = superglobal_rerank_ranking(query_vectors=xq.to(device), database=database,
                                                           ranks=ranks, reranker=reranker)
                    score_of = lookup_scores(reranker.scores(xq.shape[0]))
                    sg_rerank = (final, score_of, int(sgr["M"]))
                with timer.stage("evaluate"):
                    evaluation = evaluate_revisited(final, gnd, kappas)
                    results[label][method] = metrics_percent(evaluation)
                rankings[(label, method)] = final["medium"] if isinstance(final, Mapping) else final
                with timer.stage("per-query detail"):
                    if method in GLOBAL_KINDS:
                        details[(label, method)] = MethodDetail(
                            after=global_detail(method, evaluation=evaluation, **detail_kw))
                    else:
                        source = SCORE_SOURCES[method].format(weight=rr_cfg["cvnet"].get("weight",
                                                                                         CVNET_SCORE_WEIGHT))
                        after = ranking_detail(final, evaluation, gnd, top=top, score_of=score_of, source=source)
                        details[(label, method)] = MethodDetail(after=after, before=global_detail(base, **detail_kw),
                                                                base=base)
                logger.info("%s %s: mAP E %s M %s H %s", label, method,
                            *(format_percent(results[label][method]["mAP"][p]) for p in PROTOCOLS))

            starts: dict[tuple[str, bool, bool], tuple[np.ndarray, Any, Any]] = {
                (kind, False, False): ranked[kind] for kind in global_kinds}
            for row in rows:
                with timer.stage(f"post {row.key} {label}"):
                    flip = row.flip and not run_flip  # a run-wide flip already is in every ranking
                    key = (row.base, flip, row.whitening)
                    if key not in starts:
                        vectors = {(k[0], k[1]): v for k, v in entry["vectors"].items()
                                   if len(k) == 3 and k[2] == "flip"} if flip else entry["vectors"]
                        if row.whitening:
                            starts[key] = whitened_ranking(
                                row.base, vectors=vectors, whitening=whitenings[row.base][0],
                                with_distractors=bool(extra), cache=whitened_flip if flip else whitened,
                                device=device)
                        else:
                            fq, fb = vectors[(row.base, "query")], vectors[(row.base, "db")]
                            if extra:
                                fb = [fb, vectors[(row.base, "distractors")]]
                            _, franks = global_ranking(fq, fb, device=device, with_similarities=False,
                                                       rank_dtype=np.int32)
                            starts[key] = (franks, fq, fb)
                    start = starts[key]
                    final = rank_post_row(row, start)
                with timer.stage("evaluate"):
                    evaluation = evaluate_revisited(final, gnd, kappas)
                    results[label][row.key] = metrics_percent(evaluation)
                rankings[(label, row.key)] = final
                with timer.stage("per-query detail"):
                    after = ranking_detail(final, evaluation, gnd, top=top, score_of=global_scores(*start[1:]),
                                           source=post_score_source(row))
                    details[(label, row.key)] = MethodDetail(after=after, before=global_detail(row.base, **detail_kw),
                                                             base=row.base)
                logger.info("%s %s: mAP E %s M %s H %s", label, row.key,
                            *(format_percent(results[label][row.key]["mAP"][p]) for p in PROTOCOLS))

            if export_cfg.get("ames") and extra is None:
                with timer.stage(f"export {name}"):
                    ranks, xq, xb = ranked["superglobal"]
                    exports[name] = export_ames(
                        export_cfg["ames"], name=name, query_set=entry["query_set"], db_set=entry["db_set"], xq=xq,
                        xb=xb, ranks=ranks, m=int(export_cfg["shortlist"]),
                        reranked=sg_rerank if export_cfg.get("reranked") else None)
    post = {}
    for row in rows:
        saved, info = whitenings.get(row.base, (None, {})) if row.whitening else (None, {})
        post[row.key] = {"base": row.base, "steps": list(row.steps),
                         "applied": row.applied(info.get("dim") if saved is not None else None),
                         "settings": row.settings(info)}
    return EvalOutcome(results=results, rankings=rankings, plan=plan, timer=timer, data=data, names=names,
                       builtin=builtin, distractors=distractors, root=root, min_side=min_side, details=details,
                       rows=row_order(methods, rows), post=post, weights_sha256=weights_sha256, exports=exports)
