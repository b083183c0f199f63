"""The evaluation run behind ``eval.py``: a short sequence of named stages, each with explicit inputs and outputs.

    run = prepare(cfg, env=env, timer=timer)            # settings, datasets, post rows, weights, models: EvalRun
    whitenings = learn_whitenings(run, timer=timer)      # {kind: whitening} of the models whitened rows start from
    descriptors = describe(run, timer=timer)             # {DescriptorKey: Descriptors}; its units of work are
                                                         #   the DescribeJobs, one per (dataset, split, kind, flip)
    for label in run.labels:                             # rank 0: each dataset, then it with the distractors
        ranked = rank(run, descriptors, label)           # {kind: GlobalRanking}
        rows = rerank(run, label, ranked)                # the methods' rows (CVNet-Rerank, SuperGlobal re-ranking)
        rows += post_process(run, descriptors, ...)      # the post-processed rows (post.rows)
        scores = score(run, label, rows, ranked)         # metrics and per-query detail of every row
        export(run, label, ranked, rows)                 # AMES / LoCoRe files (export.ames)

    outcome = run_evaluation(cfg, env=init_distributed(cfg["device"]))   # all of it
    outcome.results["synth"]["cvnet_rerank"]["mAP"]["hard"]              # percent

Methods: ``cvnet_global``, ``cvnet_rerank`` (CVNet-Global ranking re-ranked by CVNet-Rerank), ``superglobal``,
``superglobal_rerank``, ``timm_global``. The models the methods need are built once and their descriptors shared.
Under torchrun every rank runs prepare, learn_whitenings and describe: each extraction (queries, database,
distractors, flip variants, the whitening's training images) is cut into pieces that do not depend on the number of
ranks, each rank extracts an even share and rank 0 merges them (helpers.feature_cache). Rank 0 ranks; CVNet
re-ranking splits its chunks of database images over the ranks and rank 0 gathers the scores
(helpers.evaluation.rerank). Rank 0 alone learns the whitening, post-processes, scores and writes files. The
figures are bit-identical to one process's: every image is extracted, and every pair scored, in the same batch
whatever the number of ranks.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.constants import CVNET_SCORE_WEIGHT
from common.timing import timed
from datasets.revisited import RevisitedDataset
from helpers.builders import GLOBAL_KINDS, global_dim
from helpers.config import ConfigError
from helpers.distributed import DistEnv, barrier
from helpers.evaluation.data import (
    CombinedReader,
    DescriptorKey,
    Descriptors,
    DeviceCopies,
    EvalSets,
    GlobalRanking,
    build_builtin_dataset,
    check_named_dataset,
    dataset_label,
    dataset_protocols,
    file_name,
    folder_training_dir,
    open_distractors,
    open_revisited,
    rank_descriptors,
    resolve_datasets,
    stored_distractors,
)
from helpers.evaluation.detail import (
    SCORE_SOURCES,
    MethodDetail,
    RankingDetail,
    ScoreFn,
    global_detail,
    global_scores,
    lookup_scores,
    ranking_detail,
    shown_ranking,
)
from helpers.evaluation.export import check_exports, export_ames
from helpers.evaluation.metrics import evaluate_revisited, format_percent, metrics_percent
from helpers.evaluation.models import METHOD_BASE, ModelSet, WeightsPlan, load_models, needed_models, scales_for
from helpers.evaluation.post import (
    PostRow,
    WhiteningContext,
    check_whitening_source,
    obtain_whitening,
    post_rows,
    post_score_source,
    post_summary,
    rank_post_row,
    row_order,
    whiten_descriptors,
)
from helpers.evaluation.rerank import run_cvnet_rerank, run_superglobal_rerank, serve_cvnet_rerank
from helpers.feature_cache import cached_global_descriptors

logger = logging.getLogger(__name__)

#: {kind: (whitening {'mean', 'projection', ...} or None off rank 0, its whitening_info)}
Whitenings = dict[str, tuple[dict[str, Any] | None, dict[str, Any]]]


class Timer:
    """Wall time per named stage (seconds, summed over repeats)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the ``with`` block as stage ``name`` (logged)."""
        return timed(self.stages, name, logger=logger)


# --------------------------------------------------------------------------------------------------------------
# What the stages pass on
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    """A block of the report: dataset ``name``'s queries against its database, followed by the distractors
    ``extra`` when given (``key``: ``roxford5k`` or ``roxford5k+1m``)."""

    name: str
    extra: str | None = None

    @property
    def key(self) -> str:
        return dataset_label(self.name, self.extra)


@dataclass
class EvalRun:
    """What the prepare stage settles for the later ones: the checked config ``cfg`` (each stage reads its own
    section), the process ``env``, the datasets (``names``, opened as ``sets``; ``builtin`` when the built-in
    benchmark is one of them), the ``methods``, the global rankings the run computes (``kinds``), the post-processed
    ``rows``, the models and the extraction engine's keywords (``extract_kw``)."""

    cfg: Mapping[str, Any]
    env: DistEnv
    names: list[str]
    builtin: bool
    sets: dict[str, EvalSets]
    methods: list[str]
    kinds: list[str]
    rows: list[PostRow]
    models: ModelSet
    extract_kw: dict[str, Any]
    #: the descriptors' copies on the run's GPU, made once and shared by every ranking (helpers.evaluation.data)
    device_copies: DeviceCopies | None = None

    @property
    def root(self) -> str:
        return os.fspath(self.cfg["data"]["root"])

    @property
    def min_side(self) -> int | None:
        return self.cfg["data"].get("min_side")

    @property
    def distractors(self) -> str | None:
        return self.cfg["data"].get("distractors")

    @property
    def run_flip(self) -> bool:
        """``extraction.flip``: every ranking of the run from flip-averaged descriptors."""
        return bool(self.cfg["extraction"].get("flip", False))

    @property
    def labels(self) -> list[Label]:
        extras = [None, self.distractors] if self.distractors else [None]
        return [Label(name, extra) for name in self.names for extra in extras]

    def key(self, name: str, kind: str, *, flip: bool = False) -> DescriptorKey:
        """The descriptors a ranking of ``kind`` on dataset ``name`` uses: flip-averaged when the run or (``flip``)
        the row asks."""
        return DescriptorKey(name, kind, flip or self.run_flip)

    def flips(self, kind: str) -> tuple[bool, ...]:
        """The descriptor variants of ``kind`` the run needs: the run's own, and flip-averaged ones for a flip row."""
        extra = (True,) if not self.run_flip and any(r.flip and r.base == kind for r in self.rows) else ()
        return (self.run_flip, *extra)


@dataclass
class RowRanking:
    """One row of a label: its ranking ``final`` ((n_db, nq), or per protocol for CVNet's paper mode) and, for a row
    that re-orders global ranking ``base``, the scores it was sorted by (``score_of``) and what they are
    (``source``). A global method's row has no ``base``: its detail is that of the global ranking itself."""

    key: str
    final: np.ndarray | dict[str, np.ndarray]
    base: str | None = None
    score_of: ScoreFn | None = None
    source: str = ""


@dataclass
class Scores:
    """What the score stage finds: ``results[label][row]`` (percent, :func:`metrics_percent`), and per
    (label, row) the Medium ranking (n_db, nq) and the per-query :class:`MethodDetail`."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    rankings: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    details: dict[tuple[str, str], MethodDetail] = field(default_factory=dict)

    def update(self, other: Scores) -> None:
        self.results.update(other.results)
        self.rankings.update(other.rankings)
        self.details.update(other.details)


@dataclass
class EvalOutcome:
    """What a run found: ``results[label][row]`` (percent, :func:`helpers.evaluation.metrics_percent`) for each
    method and post-processed row, the Medium ranking (n_db, nq) behind each, the weights plan (and the sha256 of
    each weights file), stage timings, the datasets opened (``sets``), per (label, row) the per-query
    :class:`MethodDetail`, the rows in report order (``rows``), what each post-processed row applied (``post``) and
    the files exported (``exports``)."""

    results: dict[str, dict[str, Any]]
    rankings: dict[tuple[str, str], np.ndarray]
    plan: WeightsPlan
    timer: Timer
    sets: dict[str, EvalSets]
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
        return self.sets[label.removesuffix("+1m")].query

    def db_reader(self, label: str) -> CombinedReader:
        """Images of the ranked items of ``label``: the database, then the distractors for a ``+1m`` label (their
        list of a million names is read once)."""
        if label not in self._readers:
            db = self.sets[label.removesuffix("+1m")].db
            extra = None
            if label.endswith("+1m"):
                extra = open_distractors(root=self.root, convention=db.convention, scales=(1.0,),
                                         min_side=self.min_side)
            self._readers[label] = CombinedReader(db, extra)
        return self._readers[label]


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def run_evaluation(cfg: Mapping[str, Any], *, env: DistEnv | None = None) -> EvalOutcome | None:
    """Evaluate every (dataset, method) and post-processed row of the checked config ``cfg`` (see
    helpers.schemas.EVAL) on ``env.device``; returns the outcome on rank 0, None on the other ranks."""
    env = env or DistEnv()
    timer = Timer()
    run = prepare(cfg, env=env, timer=timer)
    whitenings = learn_whitenings(run, timer=timer)
    descriptors = describe(run, timer=timer)
    if not env.is_main:
        serve_reranking(run, timer=timer)
        logger.info("rank %d: its share of the extraction and re-ranking is done; rank 0 evaluates", env.rank)
        return None
    scores, exports = Scores(), {}
    whitened: dict[DescriptorKey, Descriptors] = {}  # a dataset's whitened descriptors, for its +1M label too
    for label in run.labels:
        if label.extra is None:
            whitened = {}  # the previous dataset's are no longer needed (+1M: gigabytes)
        ranked = rank(run, descriptors, label, timer=timer)
        rows = rerank(run, label, ranked, timer=timer)
        rows += post_process(run, descriptors, whitenings, label, ranked, whitened=whitened, timer=timer)
        scores.update(score(run, label, rows, ranked, timer=timer))
        exported = export(run, label, ranked, rows, timer=timer)
        if exported is not None:
            exports[label.name] = exported
    return EvalOutcome(results=scores.results, rankings=scores.rankings, plan=run.models.plan, timer=timer,
                       sets=run.sets, names=run.names, builtin=run.builtin, distractors=run.distractors,
                       root=run.root, min_side=run.min_side, details=scores.details,
                       rows=row_order(run.methods, run.rows), post=post_summary(run.rows, whitenings),
                       weights_sha256=run.models.sha256, exports=exports)


# --------------------------------------------------------------------------------------------------------------
# Prepare: settings, datasets, weights and models
# --------------------------------------------------------------------------------------------------------------


def prepare(cfg: Mapping[str, Any], *, env: DistEnv, timer: Timer) -> EvalRun:
    """Check the settings, settle the datasets (drawing the built-in benchmark when it is one of them, checking that
    every named one is on disk), the post-processed rows, the weights and the models, and open each dataset."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    methods = list(cfg["methods"])
    if not methods:
        raise ConfigError("methods is empty")
    needed = needed_models(methods)
    check_exports(cfg, needed)
    kinds = sorted(needed & set(GLOBAL_KINDS))
    rows = configured_rows(cfg.get("post"), kinds=kinds)
    names, builtin = settle_datasets(cfg["data"], progress=show_progress(cfg, env), timer=timer, draw=env.is_main)
    barrier()  # under torchrun the other ranks read the built-in benchmark once rank 0 has drawn it
    models = load_models(needed=needed, model_cfg=cfg["model"], seed=int(cfg.get("seed", 0)), device=env.device,
                         building=timer.stage("build models"))
    # the sets a report reads (images, names, ground truth): opened as the first global model reads them
    first = models.models[kinds[0]]
    kw = {"root": os.fspath(cfg["data"]["root"]), "convention": first.input_convention,
          "scales": scales_for(kinds[0], cfg["model"]), "min_side": cfg["data"].get("min_side")}
    sets = {name: EvalSets(query=open_revisited(name=name, split="query", **kw),
                           db=open_revisited(name=name, split="db", **kw)) for name in names}
    return EvalRun(cfg=cfg, env=env, names=names, builtin=builtin, sets=sets, methods=methods, kinds=kinds, rows=rows,
                   models=models, extract_kw=extraction_settings(cfg, env), device_copies=DeviceCopies(env.device))


def configured_rows(post_cfg: Mapping[str, Any] | None, *, kinds: Sequence[str]) -> list[PostRow]:
    """The post-processed rows of ``post.rows`` for each global ranking in ``kinds``; a whitened row needs a
    whitening source (refused before anything runs)."""
    post_cfg = post_cfg or {"rows": []}
    rows = post_rows(post_cfg, kinds=kinds) if post_cfg.get("rows") else []
    if any(r.whitening for r in rows):
        check_whitening_source((post_cfg.get("whitening") or {}).get("source"))
    return rows


def settle_datasets(data_cfg: Mapping[str, Any], *, progress: bool, timer: Timer,
                    draw: bool = True) -> tuple[list[str], bool]:
    """The datasets of the run (:func:`helpers.evaluation.data.resolve_datasets`) and whether the built-in benchmark
    is one of them; draws it (idempotently; ``draw`` False: another rank does), and checks that each named one is on
    disk, naming it if not."""
    root = os.fspath(data_cfg["root"])
    names, builtin = resolve_datasets(data_cfg)
    for name in names:
        if builtin and name == data_cfg["synthetic"]["name"]:
            if not draw:
                continue
            with timer.stage("build synthetic dataset"):
                build_builtin_dataset(root=root, synthetic=data_cfg["synthetic"], progress=progress)
        else:
            check_named_dataset(root, name)
    return names, builtin


def show_progress(cfg: Mapping[str, Any], env: DistEnv) -> bool:
    """Progress bars: when ``progress`` is on, on rank 0 only."""
    return bool(cfg.get("progress", True)) and env.is_main


def extraction_settings(cfg: Mapping[str, Any], env: DistEnv) -> dict[str, Any]:
    """The extraction engine's keywords (:func:`helpers.feature_cache.cached_global_descriptors`) of a run: device,
    batches, workers and shards (``extraction.*``), this process's rank, progress bars and the feature cache."""
    ext = cfg["extraction"]
    return {"device": env.device, "batch_size": int(ext["batch_size"]), "num_workers": int(ext["num_workers"]),
            "shard_size": ext.get("shard_size"), "rank": env.rank, "world_size": env.world_size,
            "progress": show_progress(cfg, env), "cache_dir": ext.get("cache_dir")}


# --------------------------------------------------------------------------------------------------------------
# Learn whitening; describe
# --------------------------------------------------------------------------------------------------------------


def learn_whitenings(run: EvalRun, *, timer: Timer) -> Whitenings:
    """The whitening of each model a whitened row starts from (:func:`helpers.evaluation.post.obtain_whitening`:
    loaded, reused, or learned on the built-in training split or a class folder's training images,
    :func:`helpers.evaluation.data.folder_training_dir`); {} without whitened rows. It runs before the
    describe stage, so that a whitening this run cannot have stops the run before the long extractions.

    Under torchrun every rank extracts its share of the training images; rank 0 alone learns the PCA (one
    eigendecomposition of a (d, d) covariance: about a second, less than gathering the descriptors on every rank
    would cost) while the others go on to the describe stage."""
    kinds = sorted({r.base for r in run.rows if r.whitening})
    if not kinds:
        return {}
    white_cfg = (run.cfg.get("post") or {}).get("whitening") or {}
    plan = run.models.plan
    ctx = WhiteningContext(
        source=white_cfg.get("source"), dim=white_cfg.get("dim"), max_images=white_cfg.get("images"),
        weights_file=plan.global_path, weights_sha256=run.models.sha256.get(plan.global_path or ""), root=run.root,
        train_name=run.cfg["data"]["synthetic"]["name"] if run.builtin else None,
        train_dir=None if run.builtin else folder_training_dir(run.names), min_side=run.min_side,
        cache_dir=run.cfg["extraction"].get("cache_dir"), depth=int(run.cfg["model"]["depth"]),
        extract_kw=run.extract_kw)
    whitenings = {}
    for kind in kinds:
        model = run.models.models[kind]
        with timer.stage(f"whitening {kind}"):
            whitenings[kind] = obtain_whitening(ctx, kind=kind, model=model, state_hash=run.models.hashes[kind],
                                                d=global_dim(model), scales=scales_for(kind, run.cfg["model"]),
                                                is_main=run.env.is_main)
    return whitenings


@dataclass(frozen=True)
class DescribeJob:
    """One unit of work of the describe stage: split ``split`` (query, db or distractors) of dataset ``dataset``
    (for the distractors: their name) through global model ``kind``, flip-averaged or not."""

    dataset: str
    split: str
    kind: str
    flip: bool


def describe_jobs(names: Sequence[str], kinds: Sequence[str], *, distractors: str | None,
                  flips: Mapping[str, Sequence[bool]]) -> list[DescribeJob]:
    """Every extraction a run needs, in order: per dataset and model, for each of its variants ``flips[kind]``, the
    queries, the database and the distractors; the distractors once per (model, variant), whatever the datasets."""
    jobs = []
    for name in names:
        for kind in kinds:
            for flip in flips[kind]:
                jobs += [DescribeJob(name, split, kind, flip) for split in ("query", "db")]
                if distractors:
                    jobs.append(DescribeJob(distractors, "distractors", kind, flip))
    return list(dict.fromkeys(jobs))


def describe(run: EvalRun, *, timer: Timer) -> dict[DescriptorKey, Descriptors]:
    """Every global descriptor the run needs (:func:`describe_jobs`), each through :func:`extract_descriptors`,
    held per (dataset, kind, flip). On the ranks other than 0 of a sharded extraction the tensors are None."""
    jobs = describe_jobs(run.names, run.kinds, distractors=run.distractors, flips={k: run.flips(k) for k in run.kinds})
    first_distractors = next((j for j in jobs if j.split == "distractors"), None)
    opened: dict[DescribeJob, Dataset] = {}  # a flip variant reads the dataset its plain job opened
    vectors: dict[DescribeJob, Tensor | None] = {}
    for job in jobs:
        name = job.dataset if job.split == "distractors" else f"{job.dataset} {job.split}"
        with timer.stage(f"extract {job.kind} {name}" + (" (flip)" if job.flip and not run.run_flip else "")):
            plain = replace(job, flip=False)
            if plain not in opened:
                # the completeness scan of the 1M files runs once per run, not once per model
                opened[plain] = open_job_dataset(run, job, check=job == first_distractors)
            vectors[job] = extract_descriptors(run.models, job.kind, opened[plain], label=job_label(run, job),
                                               flip=job.flip, extract_kw=run.extract_kw)
            if job.split == "distractors":
                vectors[job] = stored_distractors(vectors[job], run.cfg["data"]["distractors_dtype"])
    out = {}
    for job in jobs:
        if job.split == "query":
            extra = DescribeJob(run.distractors, "distractors", job.kind, job.flip) if run.distractors else None
            out[DescriptorKey(job.dataset, job.kind, job.flip)] = Descriptors(
                query=vectors[job], db=vectors[replace(job, split="db")], distractors=vectors.get(extra))
    return out


def open_job_dataset(run: EvalRun, job: DescribeJob, *, check: bool = False) -> Dataset:
    """The dataset of a describe job, as model ``job.kind`` reads it (its input convention and scales); ``check``:
    every listed distractor must be on disk."""
    kw = {"convention": run.models.models[job.kind].input_convention, "scales": scales_for(job.kind, run.cfg["model"]),
          "min_side": run.min_side}
    if job.split == "distractors":
        return open_distractors(root=run.root, progress=show_progress(run.cfg, run.env), check=check, **kw)
    return open_revisited(root=run.root, name=job.dataset, split=job.split, **kw)


def job_label(run: EvalRun, job: DescribeJob) -> str:
    """The feature cache's name of a describe job: ``<dataset>-<split>-<kind>-r<depth>`` (the distractors:
    ``<name>-<kind>-r<depth>``), ``-flip`` for the flip-averaged variant of a run that is not flipped as a whole."""
    what = job.dataset if job.split == "distractors" else f"{file_name(job.dataset)}-{job.split}"
    return f"{what}-{job.kind}-r{int(run.cfg['model']['depth'])}" + ("-flip" if job.flip and not run.run_flip else "")


def extract_descriptors(models: ModelSet, kind: str, dataset: Dataset, *, label: str, flip: bool = False,
                        extract_kw: Mapping[str, Any]) -> Tensor | None:
    """The global descriptors (N, d) of ``dataset`` by model ``kind`` of ``models``, through the feature cache
    (:func:`helpers.feature_cache.cached_global_descriptors`, under ``label``); None on ranks other than 0 of a
    sharded extraction."""
    return cached_global_descriptors(model=models.models[kind], dataset=dataset, label=label,
                                     weights_hash=models.hashes[kind], weights_source=models.sources[kind], flip=flip,
                                     **extract_kw)


# --------------------------------------------------------------------------------------------------------------
# Rank, re-rank, post rows (rank 0, per label)
# --------------------------------------------------------------------------------------------------------------


def rank(run: EvalRun, descriptors: Mapping[DescriptorKey, Descriptors], label: Label, *,
         timer: Timer) -> dict[str, GlobalRanking]:
    """The global ranking of each model over the run's descriptors of ``label`` (the database, then the
    distractors for a +1M label)."""
    ranked = {}
    for kind in run.kinds:
        with timer.stage(f"rank {kind} {label.key}"):
            ranked[kind] = rank_descriptors(descriptors[run.key(label.name, kind)],
                                            with_distractors=label.extra is not None, device=run.env.device,
                                            copies=run.device_copies)
    return ranked


def rerank(run: EvalRun, label: Label, ranked: Mapping[str, GlobalRanking], *, timer: Timer) -> list[RowRanking]:
    """Each method's row: a global method's ranking as it is; a re-ranking method's re-ordering of the global
    ranking it starts from (CVNet-Rerank, SuperGlobal re-ranking), with the scores it sorted by."""
    rr = run.cfg["rerank"]
    rows = []
    for method in run.methods:
        base = METHOD_BASE[method]
        if method in GLOBAL_KINDS:
            rows.append(RowRanking(method, ranked[method].ranks))
            continue
        with timer.stage(f"{method} {label.key}"):
            if method == "cvnet_rerank":
                final, scores = run_cvnet_rerank(ranked=ranked[base], gnd=run.sets[label.name].query.gnd,
                                                 env=run.env, **cvnet_scorer_settings(run, label))
            else:
                final, scores = run_superglobal_rerank(ranked[base], rr["superglobal"], device=run.env.device)
        source = SCORE_SOURCES[method].format(weight=rr["cvnet"].get("weight", CVNET_SCORE_WEIGHT))
        rows.append(RowRanking(method, final, base=base, score_of=lookup_scores(scores), source=source))
    return rows


def cvnet_scorer_settings(run: EvalRun, label: Label) -> dict[str, Any]:
    """The keywords of :func:`helpers.evaluation.rerank.cvnet_pair_scorer` for ``label``, the same on every rank."""
    return {"model": run.models.models["cvnet_rerank"], "root": run.root, "name": label.name, "extra": label.extra,
            "min_side": run.min_side, "rr": run.cfg["rerank"]["cvnet"], "ext_cfg": run.cfg["extraction"],
            "device": run.env.device, "weights_hash": run.models.hashes["cvnet_rerank"],
            "progress": show_progress(run.cfg, run.env)}


def serve_reranking(run: EvalRun, *, timer: Timer) -> None:
    """What a rank other than 0 does once the descriptors are extracted: its share of each label's CVNet re-ranking
    (:func:`helpers.evaluation.rerank.serve_cvnet_rerank`), label after label as rank 0 reaches it.

    Between two labels it waits, in the broadcast of the next label's pairs, while rank 0 post-processes, scores
    and exports the previous label and ranks the next: seconds on the revisited sets, a few minutes at most with
    the R1M distractors, well inside the process group's 30-minute timeout."""
    if "cvnet_rerank" not in run.methods:
        return
    for label in run.labels:
        with timer.stage(f"cvnet_rerank {label.key}"):
            serve_cvnet_rerank(env=run.env, **cvnet_scorer_settings(run, label))


def post_process(run: EvalRun, descriptors: Mapping[DescriptorKey, Descriptors], whitenings: Whitenings,
                 label: Label, ranked: Mapping[str, GlobalRanking], *, whitened: dict[DescriptorKey, Descriptors],
                 timer: Timer) -> list[RowRanking]:
    """Each post-processed row: the global ranking of its model, over flip-averaged and / or whitened descriptors
    when the row asks, re-ordered by its post-processing steps. ``whitened`` keeps a dataset's whitened descriptors
    for its +1M label (which then whitens only the distractors).

    Rank 0 alone runs the post rows while the other ranks wait for the next label's re-ranking: each row is a pass
    over the descriptors and the global ranking only rank 0 holds (α-QE, α-DBA and k-reciprocal within a
    shortlist, whitening a matrix product), seconds where the extractions take minutes, and splitting them would
    first send every rank the database's descriptors (8 GB per model with R1M). Their costly part, the flip
    descriptors, is an extraction, split over the ranks in the describe stage."""
    with_distractors = label.extra is not None
    # the global ranking each row starts from, by (descriptors, whitened): the run's own ones are ranked already
    starts = {(run.key(label.name, kind), False): ranked[kind] for kind in run.kinds}
    rows = []
    for row in run.rows:
        with timer.stage(f"post {row.key} {label.key}"):
            key = run.key(label.name, row.base, flip=row.flip)
            if (key, row.whitening) not in starts:
                chosen = descriptors[key]
                if row.whitening:
                    whitened[key] = whiten_descriptors(chosen, whitenings[row.base][0],
                                                       with_distractors=with_distractors, done=whitened.get(key))
                    chosen = whitened[key]
                starts[(key, row.whitening)] = rank_descriptors(chosen, with_distractors=with_distractors,
                                                                device=run.env.device, copies=run.device_copies)
            start = starts[(key, row.whitening)]
            final = rank_post_row(row, start)
        rows.append(RowRanking(row.key, final, base=row.base, score_of=global_scores(start.query, start.database),
                               source=post_score_source(row)))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Score, export
# --------------------------------------------------------------------------------------------------------------


def score(run: EvalRun, label: Label, rows: Sequence[RowRanking], ranked: Mapping[str, GlobalRanking], *,
          timer: Timer) -> Scores:
    """The metrics (:func:`evaluate_revisited`, under the dataset's protocols: :func:`dataset_protocols`) and the
    per-query detail of each row of ``label``: a row that re-orders a global ranking shows that ranking beside its
    own (``before``)."""
    gnd = run.sets[label.name].query.gnd
    protocols, recall = dataset_protocols(run.sets[label.name].query)
    kappas, top = [int(k) for k in run.cfg["eval"]["kappas"]], int(run.cfg["viz"]["top"])
    cache: dict[str, RankingDetail] = {}  # each global ranking's detail, shared by the rows that start from it
    detail_kw = {"ranked": ranked, "gnd": gnd, "kappas": kappas, "top": top, "cache": cache, "protocols": protocols}
    out = Scores(results={label.key: {}})
    for row in rows:
        with timer.stage("evaluate"):
            evaluation = evaluate_revisited(row.final, gnd, kappas, protocols=protocols, recall=recall)
            out.results[label.key][row.key] = metrics_percent(evaluation)
        out.rankings[(label.key, row.key)] = shown_ranking(row.final)
        with timer.stage("per-query detail"):
            if row.base is None:
                detail = MethodDetail(after=global_detail(row.key, evaluation=evaluation, **detail_kw))
            else:
                after = ranking_detail(row.final, evaluation, gnd, top=top, score_of=row.score_of, source=row.source)
                detail = MethodDetail(after=after, before=global_detail(row.base, **detail_kw), base=row.base)
            out.details[(label.key, row.key)] = detail
        logger.info("%s %s: mAP %s", label.key, row.key, " ".join(
            f"{p[0].upper()} {format_percent(v)}" for p, v in out.results[label.key][row.key]["mAP"].items()))
    return out


def export(run: EvalRun, label: Label, ranked: Mapping[str, GlobalRanking], rows: Sequence[RowRanking], *,
           timer: Timer) -> dict[str, Any] | None:
    """``export.ames``: the AMES / LoCoRe files of a dataset (:func:`export_ames`; not of a +1M label), its
    SuperGlobal descriptors and shortlists from the global ranking or (``export.reranked``) the SuperGlobal
    re-ranking; None when there is nothing to export."""
    export_cfg = run.cfg.get("export") or {}
    if not export_cfg.get("ames") or label.extra is not None:
        return None
    reranked = None
    if export_cfg.get("reranked"):
        row = next(r for r in rows if r.key == "superglobal_rerank")
        reranked = (row.final, row.score_of, int(run.cfg["rerank"]["superglobal"]["M"]))
    sets = run.sets[label.name]
    with timer.stage(f"export {label.name}"):
        ranks, xq, xb = ranked["superglobal"]
        return export_ames(export_cfg["ames"], name=file_name(label.name), query_set=sets.query, db_set=sets.db,
                           xq=xq, xb=xb, ranks=ranks, m=int(export_cfg["shortlist"]), reranked=reranked)
