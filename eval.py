"""Evaluate CVNet / SuperGlobal on revisited Oxford and Paris (+1M distractors), or on the built-in benchmark.

    python eval.py                                            # built-in synthetic benchmark, no download
    python eval.py --config configs/cvnet_rerank_r50.yaml data.root=/data model.weights=weights/CVPR2022_CVNet_R50.pyth
    torchrun --nproc_per_node 4 eval.py --config configs/superglobal_r101.yaml data.distractors=revisitop1m

Methods: ``cvnet_global``, ``cvnet_rerank`` (CVNet-Global ranking re-ranked by CVNet-Rerank), ``superglobal``,
``superglobal_rerank``; several in one run share their extracted descriptors, and the on-disk feature cache lets
a later run (or one that adds re-ranking) skip extraction. Output: a Markdown table (mAP Easy / Medium / Hard,
mP@1/5/10) on stdout, ``results.json``, the resolved ``config.yaml`` and PNG result grids in the run directory
(``<output_dir>/<name or timestamp>/``). Rows that reproduce a paper row show the paper's figure beside ours.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from datasets.revisited import RevisitedDataset, Revisitop1M
from helpers.config import ConfigError, load_config, save_resolved
from helpers.evaluation import PROTOCOLS, evaluate_revisited
from helpers.extraction import ReducedMapStore, cached_global_descriptors, state_dict_hash
from helpers.reranking import CVNetPairScorer, cvnet_rerank, global_ranking, superglobal_rerank_ranking
from helpers.visualize import save_query_grids
from models import (
    CheckpointError,
    CVNetGlobal,
    CVNetRerank,
    SuperGlobal,
    SuperGlobalRerank,
    load_official_checkpoint,
)

logger = logging.getLogger("eval")

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "eval_builtin.yaml"
METHODS = ("cvnet_global", "cvnet_rerank", "superglobal", "superglobal_rerank")
RANDOM_WEIGHTS = "random — numbers are meaningless"
NOT_COMPARABLE = ("Built-in synthetic benchmark: these numbers are NOT comparable with the papers' tables "
                  "(revisited Oxford / Paris); they check that the pipeline runs and learns.")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "output_dir": "runs/eval",
    "seed": 0,
    "device": "auto",
    "threads": None,
    "methods": list(METHODS),
    "data": {
        "root": "data",
        "datasets": ["roxford5k", "rparis6k"],
        "distractors": None,
        "distractors_dtype": "float32",
        "min_side": None,
        "synthetic": None,
    },
    "model": {
        "depth": 50,
        "weights": None,
        "builtin_checkpoints": None,
        "cvnet_scales": [0.7071, 1.0, 1.4142],
        "superglobal": {"gemp": True, "rgem": True, "sgem": True, "relup": True,
                        "scales": [0.7071, 1.0, 1.4142], "antialias": True},
    },
    "rerank": {
        "cvnet": {"mode": "clean", "top_k": 100, "weight": 0.5, "batch_size": 32, "chunk_images": 256,
                  "cache_maps": False},
        "superglobal": {"M": 400, "K": 9, "beta": 0.15, "database": "tensor"},
    },
    "extraction": {"batch_size": 8, "num_workers": 0, "cache_dir": "cache/features", "shard_size": 20000},
    "eval": {"kappas": [1, 5, 10]},
    "viz": {"num_queries": 3, "top": 10, "height": 160},
    "paper_results": "configs/paper_results.yaml",
    "progress": True,
}

DATASET_SHORT = {"roxford5k": "ROxf", "rparis6k": "RPar"}
METHOD_TITLES = {
    "cvnet_global": "CVNet-Global",
    "cvnet_rerank": "CVNet-Global + CVNet-Rerank",
    "superglobal": "SuperGlobal",
    "superglobal_rerank": "SuperGlobal + re-ranking",
}


# --------------------------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------------------------


class Timer:
    """Wall time per named stage (seconds, summed over repeats)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.stages[name] = self.stages.get(name, 0.0) + elapsed
            logger.info("stage %-40s %7.1f s", name, elapsed)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a single process otherwise)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use device=cpu or device=auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def dataset_label(name: str, distractors: str | None) -> str:
    return f"{name}+1m" if distractors else name


def dataset_title(label: str) -> str:
    base, plus = (label[:-3], "+1M") if label.endswith("+1m") else (label, "")
    return DATASET_SHORT.get(base, base) + plus


def method_title(method: str, *, depth: int, mode: str | None = None) -> str:
    title = f"{METHOD_TITLES[method]} R{depth}"
    return f"{title} ({mode} mode)" if method == "cvnet_rerank" and mode else title


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


def open_revisited(*, root: str, name: str, split: str, convention: Any, scales: Sequence[float],
                   min_side: int | None) -> RevisitedDataset:
    """ROxford5k / RParis6k, or any dataset in their layout (the built-in benchmark), through one class."""
    return RevisitedDataset(root, name, split, convention=convention, scales=tuple(scales), min_side=min_side)


def build_builtin_dataset(*, root: str, synthetic: Mapping[str, Any], progress: bool) -> str:
    """Build (idempotently) the synthetic benchmark under ``root``; returns its dataset name."""
    from datasets.synthetic import SyntheticConfig, build_synthetic

    name = synthetic.get("name", "synth")
    config = SyntheticConfig(**(synthetic.get("config") or {}))
    build_synthetic(root, name=name, config=config, progress=progress)
    return name


class CombinedReader:
    """``read(j)`` over the database followed by the distractors (indices continue after the database)."""

    def __init__(self, db: Any, distractors: Any | None) -> None:
        self.db, self.distractors = db, distractors

    def read(self, j: int) -> np.ndarray:
        n = len(self.db)
        return self.db.read(j) if j < n else self.distractors.read(j - n)


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


def _seeded(seed: int, offset: int):
    torch.manual_seed(seed * 1000 + offset)


def build_models(*, needed: set[str], model_cfg: Mapping[str, Any], plan: WeightsPlan, seed: int,
                 device: torch.device) -> dict[str, nn.Module]:
    """The models the requested methods need ('cvnet_global', 'cvnet_rerank', 'superglobal'), loaded per plan,
    in eval mode on ``device``. Random weights come from a fixed seed per model, whatever else is built."""
    depth = int(model_cfg["depth"])
    models: dict[str, nn.Module] = {}
    if "cvnet_global" in needed:
        _seeded(seed, 1)
        models["cvnet_global"] = CVNetGlobal(depth)
        if plan.global_path:
            load_official_checkpoint(models["cvnet_global"], plan.global_path)
    if "superglobal" in needed:
        _seeded(seed, 2)
        sg = dict(model_cfg.get("superglobal") or {})
        sg["scales"] = tuple(sg.get("scales", (0.7071, 1.0, 1.4142)))
        models["superglobal"] = SuperGlobal(depth, **sg)
        if plan.global_path:
            load_official_checkpoint(models["superglobal"], plan.global_path)
    if "cvnet_rerank" in needed:
        _seeded(seed, 3)
        rerank = CVNetRerank(depth)
        if plan.rerank_path:
            load_official_checkpoint(rerank, plan.rerank_path)
        elif plan.rerank_backbone_from_global:
            source = models.get("cvnet_global")
            if source is None:
                source = CVNetGlobal(depth)
                load_official_checkpoint(source, plan.global_path)
            copy_backbone(source=source, target=rerank)
        models["cvnet_rerank"] = rerank
    for m in models.values():
        m.to(device).eval()
    return models


def copy_backbone(*, source: nn.Module, target: nn.Module) -> None:
    """Copy the shared ResNet stages of ``source.backbone`` into ``target.backbone`` (every target key must be
    present), and the input convention with them."""
    src = source.backbone.state_dict()
    dst = target.backbone.state_dict()
    missing = [k for k in dst if k not in src]
    if missing:
        raise ValueError(f"backbone copy: source lacks {missing[:5]}")
    target.backbone.load_state_dict({k: src[k] for k in dst}, strict=True)
    target.input_convention = source.input_convention


# --------------------------------------------------------------------------------------------------------------
# Paper figures
# --------------------------------------------------------------------------------------------------------------


def load_paper_results(path: str | os.PathLike | None) -> dict[str, Any]:
    if not path:
        return {}
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.is_file():
        logger.warning("paper results file %s not found: no paper figures printed", path)
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return data.get("rows", {})


def paper_figure(rows: Mapping[str, Any], *, method: str, depth: int, label: str, protocol: str
                 ) -> dict[str, Any] | None:
    """The paper's figure {'value', 'confirmed', 'source', 'note'?} for a (method, depth, dataset, protocol)."""
    for row in rows.values():
        if row.get("method") == method and int(row.get("depth", -1)) == depth:
            fig = (row.get("mAP", {}).get(label) or {}).get(protocol)
            if fig is None:
                return None
            out = {"value": float(fig["value"]), "confirmed": bool(fig.get("confirmed", False)),
                   "source": row.get("source")}
            if fig.get("note"):
                out["note"] = fig["note"]
            return out
    return None


def format_paper(fig: Mapping[str, Any] | None) -> str:
    if fig is None:
        return ""
    return f"{fig['value']:.1f}" + ("" if fig["confirmed"] else "*")


# --------------------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------------------


def needed_models(methods: Sequence[str]) -> set[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    needed = set()
    for m in methods:
        if m in ("cvnet_global", "cvnet_rerank"):
            needed.add("cvnet_global")
        if m == "cvnet_rerank":
            needed.add("cvnet_rerank")
        if m in ("superglobal", "superglobal_rerank"):
            needed.add("superglobal")
    return needed


def _scales_for(kind: str, model_cfg: Mapping[str, Any]) -> tuple[float, ...]:
    # CVNet: the dataset resizes the uint8 image per scale; SuperGlobal does its Scale-GeM inside the model
    return tuple(float(s) for s in model_cfg["cvnet_scales"]) if kind == "cvnet_global" else (1.0,)


def _percent(value: float) -> float | None:
    # a protocol without any query that has positives has no mAP: null in JSON rather than NaN
    return None if math.isnan(value) else 100 * value


def _metrics_percent(res: Mapping[str, Mapping]) -> dict[str, Any]:
    return {
        "mAP": {p: _percent(res[p]["mAP"]) for p in PROTOCOLS},
        "mP@k": {p: {str(k): _percent(v) for k, v in res[p]["mP@k"].items()} for p in PROTOCOLS},
        "n_queries": {p: int(np.sum(~np.isnan(res[p]["aps"]))) for p in PROTOCOLS},
    }


def run_evaluation(cfg: Mapping[str, Any], *, dist: DistInfo | None = None) -> dict[str, Any] | None:
    """Evaluate every (dataset, method) of ``cfg``; returns the results dict (rank 0) or None (other ranks)."""
    dist = dist or DistInfo()
    timer = Timer()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    data_cfg, model_cfg, ext_cfg = cfg["data"], cfg["model"], cfg["extraction"]
    methods = list(cfg["methods"])
    needed = needed_models(methods)
    progress = bool(cfg.get("progress", True)) and dist.main
    device = resolve_device(str(cfg.get("device", "auto")), local_rank=dist.local_rank)
    depth = int(model_cfg["depth"])
    root = os.fspath(data_cfg["root"])
    distractors = data_cfg.get("distractors")
    if distractors not in (None, "revisitop1m"):
        raise ConfigError(f"data.distractors must be null or 'revisitop1m', got {distractors!r}")
    names = list(data_cfg["datasets"])
    builtin = bool(data_cfg.get("synthetic"))
    if builtin:
        with timer.stage("build synthetic dataset"):
            synth = build_builtin_dataset(root=root, synthetic=data_cfg["synthetic"], progress=progress)
        names = [synth]
    if not names:
        raise ConfigError("data.datasets is empty")

    plan = plan_weights(model_cfg)
    with timer.stage("build models"):
        models = build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=int(cfg.get("seed", 0)),
                              device=device)
        hashes = {k: state_dict_hash(m) for k, m in models.items()}
    cache_dir = ext_cfg.get("cache_dir")
    extract_kw = {"device": device, "batch_size": int(ext_cfg["batch_size"]),
                  "num_workers": int(ext_cfg["num_workers"]), "shard_size": ext_cfg.get("shard_size"),
                  "rank": dist.rank, "world_size": dist.world_size, "progress": progress, "cache_dir": cache_dir}

    # phase 1, every rank: global descriptors (queries, database, distractors) per dataset and model
    global_kinds = sorted(needed & {"cvnet_global", "superglobal"})
    data: dict[str, dict[str, Any]] = {}
    checked_r1m = False
    for name in names:
        entry: dict[str, Any] = {"vectors": {}}
        for kind in global_kinds:
            model = models[kind]
            conv, scales = model.input_convention, _scales_for(kind, model_cfg)
            sets = {split: open_revisited(root=root, name=name, split=split, convention=conv, scales=scales,
                                          min_side=data_cfg.get("min_side")) for split in ("query", "db")}
            entry.setdefault("query_set", sets["query"])
            entry.setdefault("db_set", sets["db"])
            for split, ds in sets.items():
                with timer.stage(f"extract {kind} {name} {split}"):
                    entry["vectors"][(kind, split)] = cached_global_descriptors(
                        model=model, dataset=ds, label=f"{name}-{split}-{kind}-r{depth}",
                        weights_hash=hashes[kind], **extract_kw)
            if distractors:
                with timer.stage(f"extract {kind} revisitop1m"):
                    # the completeness scan of the 1M files runs once per run, not once per model
                    r1m = _open_distractors(root, conv, scales, data_cfg.get("min_side"), progress,
                                            check=not checked_r1m)
                    checked_r1m = True
                    vectors = cached_global_descriptors(
                        model=model, dataset=r1m, label=f"revisitop1m-{kind}-r{depth}",
                        weights_hash=hashes[kind], **extract_kw)
                    entry["vectors"][(kind, "distractors")] = _stored(vectors, data_cfg["distractors_dtype"])
        data[name] = entry
    if not dist.main:
        logger.info("rank %d: extraction done; rank 0 evaluates", dist.rank)
        return None

    # phase 2, rank 0: rankings, re-ranking, metrics, grids
    kappas = [int(k) for k in cfg["eval"]["kappas"]]
    rr_cfg = cfg["rerank"]
    results: dict[str, dict[str, Any]] = {}
    rankings: dict[tuple[str, str], np.ndarray] = {}
    for name in names:
        entry = data[name]
        gnd = entry["query_set"].gnd
        variants = [None] + ([distractors] if distractors else [])
        for extra in variants:
            label = dataset_label(name, extra)
            results[label] = {}
            ranked: dict[str, tuple[np.ndarray, Any, Any]] = {}
            for kind in global_kinds:
                xq = entry["vectors"][(kind, "query")]
                xb: Any = entry["vectors"][(kind, "db")]
                if extra:  # the database then the distractors, never concatenated (+1M: 8 GB per copy)
                    xb = [xb, entry["vectors"][(kind, "distractors")]]
                with timer.stage(f"rank {kind} {label}"):
                    _, ranks = global_ranking(xq, xb, device=device, with_similarities=False,
                                              rank_dtype=np.int32)
                ranked[kind] = (ranks, xq, xb)
            for method in methods:
                kind = "cvnet_global" if method.startswith("cvnet") else "superglobal"
                ranks, xq, xb = ranked[kind]
                if method in ("cvnet_global", "superglobal"):
                    final: Any = ranks
                elif method == "cvnet_rerank":
                    with timer.stage(f"cvnet_rerank {label}"):
                        final = _run_cvnet_rerank(
                            model=models["cvnet_rerank"], root=root, name=name, extra=extra, data_cfg=data_cfg,
                            rr=rr_cfg["cvnet"], ext_cfg=ext_cfg, ranks=ranks, xq=xq, xb=xb, gnd=gnd,
                            device=device, weights_hash=hashes["cvnet_rerank"], progress=progress)
                else:
                    with timer.stage(f"superglobal_rerank {label}"):
                        sgr = rr_cfg["superglobal"]
                        reranker = SuperGlobalRerank(M=int(sgr["M"]), K=int(sgr["K"]), beta=float(sgr["beta"]))
                        database = _superglobal_database(xb, kind=sgr.get("database", "tensor"), device=device)
                        final = superglobal_rerank_ranking(query_vectors=xq.to(device), database=database,
                                                           ranks=ranks, reranker=reranker)
                with timer.stage("evaluate"):
                    res = evaluate_revisited(final, gnd, kappas)
                results[label][method] = _metrics_percent(res)
                rankings[(label, method)] = final["medium"] if isinstance(final, Mapping) else final
                logger.info("%s %s: mAP E %s M %s H %s", label, method,
                            *(_fmt(results[label][method]["mAP"][p]) for p in PROTOCOLS))
    return {"results": results, "rankings": rankings, "plan": plan, "timer": timer, "data": data,
            "names": names, "builtin": builtin, "distractors": distractors}


def _stored(vectors: torch.Tensor | None, dtype: str) -> torch.Tensor | None:
    """The distractors' descriptors as kept for ranking: float32 (faithful) or float16 (half the memory, 4 GB
    instead of 8 GB per model for R1M; scores then carry float16 rounding, so the +1M figures can move slightly)."""
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"data.distractors_dtype must be float32 or float16, got {dtype!r}")
    return vectors.half() if vectors is not None and dtype == "float16" else vectors


def _open_distractors(root: str, convention: Any, scales: Sequence[float], min_side: int | None,
                      progress: bool, *, check: bool = False) -> Revisitop1M:
    """The R1M distractors; with ``check``, every listed image must be on disk (a missing one changes mAP)."""
    r1m = Revisitop1M(root, convention=convention, scales=tuple(scales), min_side=min_side)
    if not check:
        return r1m
    report = r1m.check_complete(progress=progress)
    if not report.complete:
        raise FileNotFoundError(
            f"revisitop1m: {len(report.missing)} of {report.n_listed} listed images are missing under "
            f"{r1m.image_dir} (e.g. {report.missing[0]}); a +1M evaluation needs all of them. Re-run "
            f"`python -m datasets.download --root {root} --datasets revisitop1m`.")
    return r1m


def _superglobal_database(xb: Any, *, kind: str, device: torch.device) -> Any:
    """What SuperGlobal re-ranks over: ``tensor`` passes the descriptors (or their parts) through, and the
    candidates are read off the global ranking; ``tensor_db`` / ``faiss`` index them and search again."""
    if kind == "tensor":
        return xb
    parts = list(xb) if isinstance(xb, (list, tuple)) else [xb]
    d = parts[0].shape[1]
    if kind == "tensor_db":
        from helpers.vector_db.tensor import TensorVectorDB

        db = TensorVectorDB(d, device=device, progress=False)
        db.reserve(sum(p.shape[0] for p in parts))
    elif kind == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        db = FaissVectorDB(d, index="flat")
    else:
        raise ConfigError(f"rerank.superglobal.database must be tensor, tensor_db or faiss, got {kind!r}")
    offset = 0
    for part in parts:
        db.add(part, ids=np.arange(offset, offset + part.shape[0]))
        offset += part.shape[0]
    return db


def _run_cvnet_rerank(*, model: nn.Module, root: str, name: str, extra: str | None, data_cfg: Mapping[str, Any],
                      rr: Mapping[str, Any], ext_cfg: Mapping[str, Any], ranks: np.ndarray, xq: torch.Tensor,
                      xb: torch.Tensor, gnd: Sequence[Mapping], device: torch.device, weights_hash: str,
                      progress: bool) -> dict[str, np.ndarray]:
    """CVNet re-ranking of one dataset's global ranking (maps at scale 1.0: cropped queries, full images)."""
    conv = model.input_convention
    kw = {"convention": conv, "scales": (1.0,), "min_side": data_cfg.get("min_side")}
    queries = open_revisited(root=root, name=name, split="query", **kw)
    db: Dataset = open_revisited(root=root, name=name, split="db", **kw)
    if extra:
        db = ConcatDataset([db, _open_distractors(root, conv, (1.0,), data_cfg.get("min_side"), False)])
    map_cache = os.path.join(ext_cfg["cache_dir"], "rerank_maps") if rr.get("cache_maps") and ext_cfg.get(
        "cache_dir") else None
    store_kw = {"model": model, "device": device, "cache_dir": map_cache, "batch_size": int(ext_cfg["batch_size"]),
                "num_workers": int(ext_cfg["num_workers"]), "weights_hash": weights_hash}
    scorer = CVNetPairScorer(
        model=model,
        query_maps=ReducedMapStore(dataset=queries, **store_kw),
        db_maps=ReducedMapStore(dataset=db, max_items=int(rr["chunk_images"]), **store_kw),
        batch_size=int(rr["batch_size"]), chunk_images=int(rr["chunk_images"]), progress=progress)
    return cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=scorer, mode=rr["mode"], gnd=gnd,
                        top_k=int(rr["top_k"]), weight=float(rr["weight"]))


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def comparability_notes(cfg: Mapping[str, Any], plan: WeightsPlan, builtin: bool) -> tuple[bool, list[str]]:
    """Whether paper figures are printed beside ours, and the notes on what differs from the papers' setup."""
    notes: list[str] = []
    if builtin:
        return False, [NOT_COMPARABLE]
    if plan.source != "official":
        return False, ["Paper figures are printed only with the official weights (model.weights=...)."]
    if cfg["rerank"]["cvnet"]["mode"] != "paper" and "cvnet_rerank" in cfg["methods"]:
        notes.append("CVNet re-ranking ran in 'clean' mode (first 100 of the global ranking, no ground truth); "
                     "the paper's figures used the released protocol: rerank.cvnet.mode=paper.")
    sg = cfg["model"]["superglobal"]
    off = [k for k in ("gemp", "rgem", "sgem", "relup") if not sg.get(k, True)]
    if off and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append(f"SuperGlobal ran with {', '.join(off)} switched off; the paper's rows use all four.")
    if not sg.get("antialias", True) and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append("SuperGlobal's Scale-GeM resize ran with antialias=False (the release under the pinned "
                     "torchvision resizes with antialias=True).")
    return True, notes


def markdown_tables(*, results: Mapping[str, Mapping[str, Any]], methods: Sequence[str], depth: int, mode: str,
                    paper_rows: Mapping[str, Any], show_paper: bool, kappas: Sequence[int]
                    ) -> tuple[str, dict[str, Any]]:
    """The papers' layout (rows = methods, columns = dataset x {Medium, Hard} mAP, the paper's figure in
    brackets), then per dataset the full E/M/H mAP and mP@k. Returns (markdown, paper figures used)."""
    labels = list(results)
    used: dict[str, Any] = {}
    head = ["Method"] + [f"{dataset_title(lb)} {p}" for lb in labels for p in ("M", "H")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method_title(method, depth=depth, mode=mode)]
        for lb in labels:
            for p in ("medium", "hard"):
                ours = _fmt(results[lb][method]["mAP"][p])
                fig = paper_figure(paper_rows, method=method, depth=depth, label=lb, protocol=p) if show_paper \
                    else None
                if fig is not None:
                    used.setdefault(lb, {}).setdefault(method, {})[p] = fig
                    ours += f" [{format_paper(fig)}]"
                cells.append(ours)
        lines.append("| " + " | ".join(cells) + " |")
    out = ["### mAP (%), Medium and Hard" + (" — [paper], * = figure not yet confirmed against the paper"
                                             if used else ""), "", *lines]
    for lb in labels:
        head = (["Method", "mAP E", "mAP M", "mAP H"]
                + [f"mP@{k} {p}" for p in ("M", "H") for k in kappas])
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            r = results[lb][method]
            cells = [method_title(method, depth=depth, mode=mode)]
            cells += [_fmt(r["mAP"][p]) for p in PROTOCOLS]
            cells += [_fmt(r["mP@k"][p][str(k)]) for p in ("medium", "hard") for k in kappas]
            rows.append("| " + " | ".join(cells) + " |")
        nq = results[lb][methods[0]]["n_queries"]
        out += ["", f"### {lb}: mAP E/M/H and mP@k (%) — queries with positives: "
                    f"E {nq['easy']}, M {nq['medium']}, H {nq['hard']}", "", *rows]
    return "\n".join(out), used


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def banner(lines: Sequence[str]) -> str:
    bar = "!" * 100
    return "\n".join([bar, *[f"!! {ln}" for ln in lines], bar])


def new_run_dir(output_dir: str, name: str | None) -> Path:
    base = Path(output_dir) / (name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir, k = base, 1
    while name is None and run_dir.exists():
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_report(*, cfg: Mapping[str, Any], outcome: Mapping[str, Any], run_dir: Path, start: float) -> str:
    """Print-ready text (banners, tables, timings); writes results.json and the result grids into ``run_dir``."""
    plan: WeightsPlan = outcome["plan"]
    timer: Timer = outcome["timer"]
    depth = int(cfg["model"]["depth"])
    methods = list(cfg["methods"])
    kappas = [int(k) for k in cfg["eval"]["kappas"]]
    show_paper, notes = comparability_notes(cfg, plan, outcome["builtin"])
    paper_rows = load_paper_results(cfg.get("paper_results"))

    grids: list[str] = []
    n_viz = int(cfg["viz"]["num_queries"])
    if n_viz > 0:
        with timer.stage("result grids"):
            for label in outcome["results"]:
                name = label.removesuffix("+1m")
                entry = outcome["data"][name]
                qset, dbset = entry["query_set"], entry["db_set"]
                reader = CombinedReader(dbset, None)
                if label.endswith("+1m"):
                    reader.distractors = _open_distractors(cfg["data"]["root"], dbset.convention, (1.0,),
                                                           cfg["data"].get("min_side"), False)
                queries = list(range(min(n_viz, len(qset))))
                for method in methods:
                    paths = save_query_grids(run_dir / "grids", prefix=f"{label}_{method}", query_dataset=qset,
                                             db_dataset=reader, ranks=outcome["rankings"][(label, method)],
                                             gnd=qset.gnd, queries=queries, top=int(cfg["viz"]["top"]),
                                             height=int(cfg["viz"]["height"]))
                    grids += [os.fspath(p) for p in paths]

    table, used = markdown_tables(results=outcome["results"], methods=methods, depth=depth,
                                  mode=cfg["rerank"]["cvnet"]["mode"], paper_rows=paper_rows,
                                  show_paper=show_paper, kappas=kappas)
    warn = list(plan.warnings)
    if outcome["builtin"]:
        warn.append(NOT_COMPARABLE)
    timings = dict(timer.stages)
    timings["total"] = time.perf_counter() - start
    payload = {
        "weights": plan.description,
        "weights_source": plan.source,
        "warnings": warn,
        "comparable_with_papers": show_paper,
        "notes": notes,
        "unit": "percent",
        "datasets": list(outcome["results"]),
        "methods": methods,
        "results": outcome["results"],
        "paper": used,
        "table_markdown": table,
        "timings_s": timings,
        "grids": grids,
        "run_dir": os.fspath(run_dir),
        "config": cfg,
    }
    with open(run_dir / "results.json", "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")

    parts = []
    if warn:
        parts += [banner(warn), ""]
    parts += [f"weights: {plan.description}", "", table]
    if notes:
        parts += ["", *[f"note: {n}" for n in notes]]
    parts += ["", "### wall time per stage (s)", "", "| stage | s |", "|---|---|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    parts += ["", f"results: {run_dir / 'results.json'}"]
    if warn:
        parts += ["", banner(warn)]
    return "\n".join(parts)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate CVNet / SuperGlobal on revisited Oxford/Paris (+1M), or on the built-in benchmark "
                    "when run with no arguments.")
    parser.add_argument("--config", default=None,
                        help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(REPO)}, the built-in benchmark)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=101 data.root=/data")
    return parser


def _setup_logging(main: bool) -> None:
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(args: argparse.Namespace) -> int:
    dist = dist_info_from_env()
    _setup_logging(dist.main)
    start = time.perf_counter()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides, DEFAULTS)
    except (ConfigError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    initialised = False
    if dist.world_size > 1:
        import torch.distributed as tdist

        use_cuda = torch.cuda.is_available() and str(cfg.get("device", "auto")) != "cpu"
        if use_cuda:
            torch.cuda.set_device(dist.local_rank)
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialised = True
    try:
        try:
            outcome = run_evaluation(cfg, dist=dist)
        except (FileNotFoundError, CheckpointError, ConfigError) as exc:
            logger.error("%s", exc)
            return 2
        if outcome is None:
            return 0
        run_dir = new_run_dir(cfg["output_dir"], cfg.get("name"))
        save_resolved(cfg, run_dir)
        text = write_report(cfg=cfg, outcome=outcome, run_dir=run_dir, start=start)
        print(text, flush=True)
        return 0
    finally:
        if initialised:
            import torch.distributed as tdist

            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
