"""The evaluation run behind ``eval.py``: datasets, weights, models, global descriptors, rankings, re-ranking and
the revisited metrics, for every (dataset, method) of a checked config.

    cfg = load_config("configs/eval_builtin.yaml", schema=EVAL)
    outcome = run_evaluation(cfg, env=init_distributed(cfg["device"]))
    outcome.results["synth"]["cvnet_rerank"]["mAP"]["hard"]  # percent

Methods: ``cvnet_global``, ``cvnet_rerank`` (CVNet-Global ranking re-ranked by CVNet-Rerank), ``superglobal``,
``superglobal_rerank``. The models the methods need are built once and their descriptors shared. Under torchrun
every rank extracts its shards of the descriptors; rank 0 alone ranks and scores.

Beside the methods' rows: ``post.rows`` adds post-processed copies of each global ranking (helpers.eval_post),
and ``export.ames`` writes the SuperGlobal shortlists and descriptors that AMES and LoCoRe read (helpers.export).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from common.constants import CVNET_RERANK_TOP_K, CVNET_SCORE_WEIGHT, CVNET_TEST_SCALES
from common.io import file_sha256
from common.timing import timed
from datasets.revisited import RevisitedDataset, Revisitop1M
from helpers.builders import (
    GLOBAL_KINDS,
    build_model,
    build_superglobal_reranker,
    copy_backbone,
    global_dim,
    make_database,
)
from helpers.config import ConfigError
from helpers.distributed import DistEnv
from helpers.eval_detail import (
    SCORE_SOURCES,
    MethodDetail,
    RankingDetail,
    RecordingReranker,
    RecordingScorer,
    ScoreFn,
    global_detail,
    global_scores,
    lookup_scores,
    ranking_detail,
)
from helpers.eval_post import (
    PostRow,
    WhiteningContext,
    check_whitening_source,
    obtain_whitening,
    post_rows,
    row_order,
    whiten,
)
from helpers.evaluation import PROTOCOLS, evaluate_revisited, format_percent, metrics_percent
from helpers.extraction import ReducedMapStore, cached_global_descriptors, state_dict_hash
from helpers.postprocess import postprocess_ranking
from helpers.reranking import (
    CVNetPairScorer,
    cvnet_rerank,
    db_rows,
    global_ranking,
    superglobal_rerank_ranking,
)
from models import CheckpointError

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random — numbers are meaningless"
#: Seed offsets of the random-weights models (``seed * 1000 + offset``): each model's weights do not depend on
#: which other models a run builds.
SEED_OFFSETS = {"cvnet_global": 1, "superglobal": 2, "cvnet_rerank": 3, "timm_global": 4}
#: The global rankings eval computes: the two CVNet-weight models and any timm model (model.timm).
EVAL_GLOBAL_KINDS = (*GLOBAL_KINDS, "timm_global")


def base_kind(method: str) -> str:
    """The global ranking a method starts from."""
    return "timm_global" if method == "timm_global" else ("cvnet_global" if method.startswith("cvnet")
                                                          else "superglobal")


class Timer:
    """Wall time per named stage (seconds, summed over repeats)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the ``with`` block as stage ``name`` (logged)."""
        return timed(self.stages, name, logger=logger)


def dataset_label(name: str, distractors: str | None) -> str:
    """``roxford5k`` or, with the R1M distractors, ``roxford5k+1m``."""
    return f"{name}+1m" if distractors else name


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


def open_revisited(*, root: str, name: str, split: str, convention: Any, scales: Sequence[float],
                   min_side: int | None) -> RevisitedDataset:
    """ROxford5k / RParis6k, or any dataset in their layout (the built-in benchmark), through one class."""
    return RevisitedDataset(root, name, split, convention=convention, scales=tuple(scales), min_side=min_side)


def build_builtin_dataset(*, root: str, synthetic: Mapping[str, Any], progress: bool) -> str:
    """Build (idempotently) the synthetic benchmark ``synthetic["name"]`` under ``root``; returns its name."""
    from datasets.synthetic import SyntheticConfig, build_synthetic

    name = synthetic["name"]
    build_synthetic(root, name=name, config=SyntheticConfig(**(synthetic.get("config") or {})), progress=progress)
    return name


def open_distractors(*, root: str, convention: Any, scales: Sequence[float], min_side: int | None,
                     progress: bool = False, check: bool = False) -> Revisitop1M:
    """The R1M distractors; with ``check``, every listed image must be on disk (a missing one changes mAP)."""
    r1m = Revisitop1M(root, convention=convention, scales=tuple(scales), min_side=min_side)
    if not check:
        return r1m
    report = r1m.check_complete(progress=progress)
    if not report.complete:
        raise FileNotFoundError(
            f"revisitop1m: {len(report.missing)} of {report.n_listed} listed images are missing under "
            f"{r1m.image_dir} (e.g. {report.missing[0]}); a +1M evaluation needs all of them. Re-run "
            f"`python prepare_data.py download --root {root} --datasets revisitop1m`.")
    return r1m


class CombinedReader:
    """``read(j)`` and ``name(j)`` (the file name) over the database followed by the distractors (indices
    continue after the database)."""

    def __init__(self, db: Any, distractors: Any | None) -> None:
        self.db, self.distractors = db, distractors

    def read(self, j: int) -> np.ndarray:
        n = len(self.db)
        return self.db.read(j) if j < n else self.distractors.read(j - n)

    def name(self, j: int) -> str:
        n = len(self.db)
        return os.path.basename(self.db.image_paths[j] if j < n else self.distractors.image_paths[j - n])


# --------------------------------------------------------------------------------------------------------------
# Weights and models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class WeightsPlan:
    """Which file feeds which model; ``None`` means random weights (seeded)."""

    global_path: str | None = None
    rerank_path: str | None = None
    rerank_backbone_from_global: bool = False
    source: str = "random"  # "official", "builtin" or "random"
    description: str = RANDOM_WEIGHTS
    warnings: list[str] = field(default_factory=list)


def plan_weights(model_cfg: Mapping[str, Any]) -> WeightsPlan:
    """``model.weights`` (one official-layout file for every model), else the built-in training run's newest
    checkpoints (``model.builtin_checkpoints``: rerank for all models, else backbone for the global models and
    a random re-ranking head), else random weights."""
    if model_cfg.get("weights"):
        path = os.fspath(model_cfg["weights"])
        return WeightsPlan(path, path, source="official", description=path)
    builtin = model_cfg.get("builtin_checkpoints") or {}
    rerank, backbone = builtin.get("rerank"), builtin.get("backbone")
    if rerank and os.path.isfile(rerank):
        return WeightsPlan(rerank, rerank, source="builtin",
                           description=f"built-in training run: {rerank} (all models)")
    if backbone and os.path.isfile(backbone):
        return WeightsPlan(backbone, None, rerank_backbone_from_global=True, source="builtin",
                           description=f"built-in training run: {backbone} (global models); "
                                       "CVNet re-ranking head: random",
                           warnings=[f"no re-ranking checkpoint at {rerank}: the CVNet re-ranking head "
                                     f"(conv2ds, cv_learner) is random — its numbers are meaningless"])
    looked = ", ".join(p for p in (rerank, backbone) if p) or "nowhere (model.weights is unset)"
    return WeightsPlan(warnings=[f"weights: {RANDOM_WEIGHTS} (no checkpoint found; looked at {looked}). "
                                 "Train with the built-in training run or pass model.weights=<file>."])


def verify_weights(plan: WeightsPlan, expected: str | None) -> dict[str, str]:
    """{path: sha256} of every weights file ``plan`` uses; with ``expected`` (``model.weights_sha256``), each
    must have that hash, else a :class:`CheckpointError` naming the file and both hashes."""
    files = list(dict.fromkeys(p for p in (plan.global_path, plan.rerank_path) if p))
    if expected and not files:
        raise ConfigError(f"model.weights_sha256 is set, but this run uses no weights file ({plan.description})")
    hashes = {}
    for path in files:
        if not os.path.isfile(path):
            continue  # building the model says it is missing, with where to get the official files
        hashes[path] = file_sha256(path)
        if expected and hashes[path] != expected.lower():
            raise CheckpointError(f"weights file {path} has sha256 {hashes[path]}, but model.weights_sha256 is "
                                  f"{expected.lower()}: it is not the expected file (damaged, replaced or another "
                                  "release). Fetch the file again, or correct model.weights_sha256.")
        logger.info("weights %s: sha256 %s%s", path, hashes[path], " (verified)" if expected else "")
    return hashes


def needed_models(methods: Sequence[str]) -> set[str]:
    """The models ('cvnet_global', 'cvnet_rerank', 'superglobal') the methods need (names checked by the
    schema: helpers.schemas.EVAL_METHODS)."""
    needed = set()
    for m in methods:
        needed.add(base_kind(m))
        if m == "cvnet_rerank":
            needed.add("cvnet_rerank")
    return needed


def build_models(*, needed: set[str], model_cfg: Mapping[str, Any], plan: WeightsPlan, seed: int,
                 device: torch.device) -> dict[str, nn.Module]:
    """The models in ``needed``, loaded per ``plan``, in eval mode on ``device``. Random weights come from the
    seed ``seed * 1000 + SEED_OFFSETS[kind]``, whatever else is built."""
    depth = int(model_cfg["depth"])
    kw = {"depth": depth, "device": device, "warn_random": False}  # the plan's warnings say it louder
    models: dict[str, nn.Module] = {}
    for kind in GLOBAL_KINDS:
        if kind in needed:
            options = dict(model_cfg.get("superglobal") or {}) if kind == "superglobal" else None
            models[kind] = build_model(kind, weights=plan.global_path, seed=seed * 1000 + SEED_OFFSETS[kind],
                                       options=options, **kw)
    if "cvnet_rerank" in needed:
        rerank = build_model("cvnet_rerank", weights=plan.rerank_path,
                             seed=seed * 1000 + SEED_OFFSETS["cvnet_rerank"], **kw)
        if plan.rerank_path is None and plan.rerank_backbone_from_global:
            source = models.get("cvnet_global")
            if source is None:
                source = build_model("cvnet_global", weights=plan.global_path, seed=None, **kw)
            copy_backbone(source=source, target=rerank)
        models["cvnet_rerank"] = rerank
    if "timm_global" in needed:
        timm_cfg = model_cfg.get("timm") or {}
        if not timm_cfg.get("arch"):
            raise ConfigError("methods include timm_global: set model.timm.arch=timm:<name> (and model.timm.weights "
                              "for a trained run)")
        options = None if timm_cfg.get("weights") else {"pooling": timm_cfg["pooling"], "dim": timm_cfg["dim"]}
        models["timm_global"] = build_model(timm_cfg["arch"], weights=timm_cfg.get("weights"),
                                            seed=seed * 1000 + SEED_OFFSETS["timm_global"], options=options,
                                            device=device, warn_random=timm_cfg.get("weights") is None)
    return models


def scales_for(kind: str, model_cfg: Mapping[str, Any]) -> tuple[float, ...]:
    """The dataset's image scales for a global model's extraction."""
    # CVNet: the dataset resizes the uint8 image per scale; SuperGlobal does its Scale-GeM inside the model
    if kind != "cvnet_global":
        return (1.0,)
    return tuple(float(s) for s in model_cfg.get("cvnet_scales", CVNET_TEST_SCALES))


# --------------------------------------------------------------------------------------------------------------
# Re-ranking
# --------------------------------------------------------------------------------------------------------------


def stored_distractors(vectors: torch.Tensor | None, dtype: str) -> torch.Tensor | None:
    """The distractors' descriptors as kept for ranking: float32 (faithful) or float16 (half the memory, 4 GB
    instead of 8 GB per model for R1M; scores then carry float16 rounding, so the +1M figures can move slightly)."""
    return vectors.half() if vectors is not None and dtype == "float16" else vectors


def superglobal_database(xb: Any, *, kind: str, device: torch.device) -> Any:
    """What SuperGlobal re-ranks over: ``tensor`` passes the descriptors (or their parts) through, and the
    candidates are read off the global ranking; ``tensor_db`` / ``faiss`` index them and search again."""
    if kind == "tensor":
        return xb
    parts = list(xb) if isinstance(xb, (list, tuple)) else [xb]
    d = parts[0].shape[1]
    if kind == "tensor_db":
        db = make_database("tensor", d, device=device, progress=False)
        db.reserve(sum(p.shape[0] for p in parts))
    else:
        db = make_database(kind, d, index="flat")
    offset = 0
    for part in parts:
        db.add(part, ids=np.arange(offset, offset + part.shape[0]))
        offset += part.shape[0]
    return db


def run_cvnet_rerank(*, model: nn.Module, root: str, name: str, extra: str | None, min_side: int | None,
                     rr: Mapping[str, Any], ext_cfg: Mapping[str, Any], ranks: np.ndarray, xq: torch.Tensor,
                     xb: Any, gnd: Sequence[Mapping], device: torch.device, weights_hash: str,
                     progress: bool) -> tuple[dict[str, np.ndarray], list[dict[int, float]]]:
    """CVNet re-ranking of one dataset's global ranking (maps at scale 1.0: cropped queries, full images).
    Returns the rankings per protocol and, per query, {database id: the mixed score it was re-sorted by}."""
    kw = {"convention": model.input_convention, "scales": (1.0,), "min_side": min_side}
    queries = open_revisited(root=root, name=name, split="query", **kw)
    db: Dataset = open_revisited(root=root, name=name, split="db", **kw)
    if extra:
        db = ConcatDataset([db, open_distractors(root=root, **kw)])
    map_cache = (os.path.join(ext_cfg["cache_dir"], "rerank_maps")
                 if rr.get("cache_maps") and ext_cfg.get("cache_dir") else None)
    store_kw = {"model": model, "device": device, "cache_dir": map_cache, "batch_size": int(ext_cfg["batch_size"]),
                "num_workers": int(ext_cfg["num_workers"]), "weights_hash": weights_hash}
    scorer = CVNetPairScorer(
        model=model,
        query_maps=ReducedMapStore(dataset=queries, **store_kw),
        db_maps=ReducedMapStore(dataset=db, max_items=int(rr["chunk_images"]), **store_kw),
        batch_size=int(rr["batch_size"]), chunk_images=int(rr["chunk_images"]), progress=progress)
    recorder = RecordingScorer(scorer)
    weight = float(rr.get("weight", CVNET_SCORE_WEIGHT))
    final = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=recorder, mode=rr["mode"],
                         gnd=gnd, top_k=int(rr.get("top_k", CVNET_RERANK_TOP_K)), weight=weight)
    return final, recorder.mixed_scores(xq, xb, weight=weight, nq=ranks.shape[1])


# --------------------------------------------------------------------------------------------------------------
# Post-processed rows and exports
# --------------------------------------------------------------------------------------------------------------


def post_score_source(row: PostRow) -> str:
    """What the scores shown for a post-processed row are."""
    what = f"cosine similarity of the {'whitened ' if row.whitening else ''}{row.base} descriptors"
    return what + (f", before {row.post.describe()} re-ordered the ranking" if row.post.active else "")


def whitened_ranking(kind: str, *, vectors: Mapping[tuple[str, str], Any], whitening: Mapping[str, torch.Tensor],
                     with_distractors: bool, cache: dict[tuple[str, str], torch.Tensor], device: torch.device
                     ) -> tuple[np.ndarray, torch.Tensor, Any]:
    """(ranks, whitened queries, whitened database or its parts) of global model ``kind`` over its whitened
    descriptors ``vectors[(kind, split)]``; ``cache`` keeps the whitened descriptors of a dataset, so that its
    +1M ranking whitens only the distractors."""
    splits = ("query", "db", "distractors") if with_distractors else ("query", "db")
    for split in splits:
        if (kind, split) not in cache:
            cache[(kind, split)] = whiten(vectors[(kind, split)], whitening)
    wq, wb = cache[(kind, "query")], cache[(kind, "db")]
    if with_distractors:
        wb = [wb, cache[(kind, "distractors")]]
    _, ranks = global_ranking(wq, wb, device=device, with_similarities=False, rank_dtype=np.int32)
    return ranks, wq, wb


def rank_post_row(row: PostRow, start: tuple[np.ndarray, Any, Any]) -> np.ndarray:
    """The ranking (n_db, nq) of a post-processed row from ``start`` = (ranks, xq, xb) of its (whitened) global
    ranking; a +1M database (a list of parts) goes through the shortlist mode, reading rows part by part."""
    ranks, xq, xb = start
    if not row.post.active:
        return ranks
    gather = (lambda rows: db_rows(xb, rows)) if isinstance(xb, (list, tuple)) else None
    return postprocess_ranking(xq, xb, ranks, row.post, gather=gather)


def check_exports(cfg: Mapping[str, Any], needed: set[str]) -> None:
    """``export.*`` needs the rankings it writes: refused before anything runs otherwise."""
    export = cfg.get("export") or {}
    if not export.get("ames"):
        return
    if "superglobal" not in needed:
        raise ConfigError("export.ames writes SuperGlobal shortlists: add superglobal (or superglobal_rerank) to "
                          "methods")
    if export.get("reranked") and "superglobal_rerank" not in cfg["methods"]:
        raise ConfigError("export.reranked=true exports the superglobal_rerank ranking: add superglobal_rerank to "
                          "methods")


def export_ames(out_dir: str | os.PathLike, *, name: str, query_set: RevisitedDataset, db_set: RevisitedDataset,
                xq: torch.Tensor, xb: torch.Tensor, ranks: np.ndarray, m: int,
                reranked: tuple[np.ndarray, ScoreFn, int] | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/<name>/`` for AMES and LoCoRe (:func:`helpers.export.export_shortlists`): the SuperGlobal
    descriptors, each query's top ``m`` of the SuperGlobal ranking ``ranks`` (n_db, nq) with their cosine
    similarities or, with ``reranked`` = (superglobal_rerank ranking, its score lookup, M), the re-ranked top
    min(m, M) with their re-ranking scores, the image lists relative to the dataset folder and the ground truth."""
    from helpers.export import export_shortlists

    if reranked is None:
        m = min(int(m), ranks.shape[0])
        ids = torch.from_numpy(np.ascontiguousarray(ranks[:m].T).astype(np.int64))
        sims = (xq.float() @ xb.float().T).gather(1, ids)
        source = f"superglobal global ranking, top {m}"
    else:
        final, score_of, top = reranked
        m = min(int(m), int(top), final.shape[0])
        ids = torch.from_numpy(np.ascontiguousarray(final[:m].T).astype(np.int64))
        sims = torch.from_numpy(score_of(ids.numpy())).float()
        if not torch.isfinite(sims).all():
            raise RuntimeError(f"export.reranked: the SuperGlobal re-ranking recorded no score for some of the top "
                               f"{m} of {name} (set export.shortlist <= rerank.superglobal.M)")
        source = f"superglobal_rerank ranking, top {m} with the re-ranking scores"
    written = export_shortlists(
        out_dir, dataset=name, query=xq, database=xb,
        query_names=[os.path.relpath(p, query_set.data_dir) for p in query_set.image_paths],
        database_names=[os.path.relpath(p, db_set.data_dir) for p in db_set.image_paths],
        gnd_path=query_set.gnd_path, desc_name="superglobal", ranking=(sims, ids))
    return {"shortlist": source, "m": m, "files": {k: os.fspath(v) for k, v in written.items()}}


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
    global_kinds = sorted(needed & set(EVAL_GLOBAL_KINDS))
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
                base = base_kind(method)
                ranks, xq, xb = ranked[base]
                score_of: Any = None
                if method in EVAL_GLOBAL_KINDS:
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
                    if method in EVAL_GLOBAL_KINDS:
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
