"""The post-processed rows of an evaluation (``post.rows``) and the learned whitening they may use.

    rows = post_rows(cfg["post"], kinds=["superglobal"])        # e.g. post.rows: [dba+aqe, whitening]
    rows[0].key, rows[0].steps                                   # 'superglobal+dba+aqe', ('dba', 'aqe')

A row is a global ranking (``cvnet_global`` or ``superglobal``) with some of the field's standard post-processing
applied (helpers.postprocess), reported beside the main rows: learned PCA whitening of the descriptors first, then
alpha-DBA, alpha-QE and k-reciprocal re-ranking. The whitening is learned on the built-in benchmark's training
split (``<data.root>/<synthetic name>_train``) or, for a run on class folders, on the first one's training images
(``PATH/training/``, else ``training/`` beside PATH: helpers.evaluation.data.folder_training_dir; never on the
evaluated images), with the evaluated model, and saved beside the weights file
(``<weights>.whiten-<kind>.pt``, with the weights' sha256 inside), or, with no weights file, in the feature cache
folder; a later run with the same model reuses it. ``post.whitening.source: <file>`` loads one saved earlier.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.errors import MissingFileError
from common.io import atomic_torch_save
from datasets.folder import ImageFiles, class_folder_title, class_images
from helpers.cache_keys import dataset_signature, model_signature
from helpers.config import ConfigError
from helpers.evaluation.data import Descriptors
from helpers.evaluation.models import METHOD_BASE
from helpers.feature_cache import cached_global_descriptors
from helpers.postprocess import PostProcessing, postprocess_ranking, whiten_parts
from helpers.reranking import db_rows
from helpers.schemas import POST_STEPS
from models import functional as MF

logger = logging.getLogger(__name__)

#: Format of the saved whitening files (bumped when their contents change meaning).
WHITENING_FORMAT = 1
LEARN = "learn"


# --------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostRow:
    """One extra row: the global ranking ``base`` with ``steps`` (in POST_STEPS order) applied; ``post`` holds
    the alpha-DBA / alpha-QE / k-reciprocal settings (whitening is ``whitening``)."""

    base: str
    steps: tuple[str, ...]
    post: PostProcessing

    @property
    def key(self) -> str:
        """The row's name in results.json: ``<base>+<step>+...``, e.g. ``superglobal+dba+aqe``."""
        return "+".join((self.base, *self.steps))

    @property
    def whitening(self) -> bool:
        return "whitening" in self.steps

    @property
    def flip(self) -> bool:
        """Descriptors with flip test-time augmentation (original and mirrored image, averaged, L2)."""
        return "flip" in self.steps

    def applied(self, whitening_dim: int | None = None) -> str:
        """What was applied, for titles: e.g. ``learned whitening (d=239) + α-QE k=2 α=3``."""
        parts = ["flip TTA"] if self.flip else []
        if self.whitening:
            parts.append("learned whitening" + (f" (d={whitening_dim})" if whitening_dim else ""))
        if self.post.active:
            parts.append(self.post.describe())
        return " + ".join(parts)

    def settings(self, whitening: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The settings of each step, JSON-ready (``whitening``: the whitening's :func:`whitening_info`)."""
        out: dict[str, Any] = {"flip": True} if self.flip else {}
        if self.whitening:
            out["whitening"] = dict(whitening or {})
        if self.post.dba_k:
            out["dba"] = {"k": self.post.dba_k, "alpha": self.post.dba_alpha}
        if self.post.aqe_k:
            out["aqe"] = {"k": self.post.aqe_k, "alpha": self.post.aqe_alpha}
        if self.post.kreciprocal:
            out["kreciprocal"] = {"k1": self.post.k1, "k2": self.post.k2, "lambda": self.post.lambda_value}
        if self.post.active:
            out["shortlist"], out["full_limit"] = self.post.shortlist, self.post.full_limit
        return out


def post_processing(steps: Sequence[str], post_cfg: Mapping[str, Any]) -> PostProcessing:
    """The :class:`PostProcessing` of a row's steps, with the settings of the ``post`` config section."""
    kr = post_cfg["kreciprocal"]
    return PostProcessing(
        aqe_k=int(post_cfg["aqe"]["k"]) if "aqe" in steps else 0, aqe_alpha=float(post_cfg["aqe"]["alpha"]),
        dba_k=int(post_cfg["dba"]["k"]) if "dba" in steps else 0, dba_alpha=float(post_cfg["dba"]["alpha"]),
        kreciprocal="kreciprocal" in steps, k1=int(kr["k1"]), k2=int(kr["k2"]), lambda_value=float(kr["lambda"]),
        shortlist=int(post_cfg["shortlist"]), full_limit=int(post_cfg["full_limit"]))


def post_rows(post_cfg: Mapping[str, Any], *, kinds: Sequence[str]) -> list[PostRow]:
    """The rows of ``post.rows`` (names checked by the schema: helpers.schemas.POST_ROWS) for each global
    ranking in ``kinds``, grouped by kind, in the config's order."""
    rows = []
    for kind in kinds:
        for name in dict.fromkeys(post_cfg.get("rows") or ()):
            steps = tuple(name.split("+"))
            unknown = [s for s in steps if s not in POST_STEPS]
            if unknown:  # the schema already refuses these; a caller passing its own dict gets the same words
                raise ConfigError(f"post.rows: unknown step {unknown[0]!r} in {name!r} (steps: {POST_STEPS})")
            rows.append(PostRow(base=kind, steps=steps, post=post_processing(steps, post_cfg)))
    return rows


def row_order(methods: Sequence[str], rows: Sequence[PostRow]) -> list[str]:
    """The report's row order: each method, and each post row right after its global ranking's row (or, when
    that ranking is not itself a reported method, after the first method that starts from it)."""
    order: list[str] = []
    pending = list(rows)
    for method in methods:
        order.append(method)
        base = METHOD_BASE[method]
        order += [r.key for r in pending if r.base == base]
        pending = [r for r in pending if r.base != base]
    return order + [r.key for r in pending]


# --------------------------------------------------------------------------------------------------------------
# Learned whitening
# --------------------------------------------------------------------------------------------------------------


class TrainImages(ImageFiles):
    """The images a whitening is learned on, or ``max_images`` of them evenly spaced over their list, as engine
    items (one normalised (3, H_s, W_s) tensor per scale, as the evaluation datasets give them): the built-in
    benchmark's training split (:meth:`builtin`) or a class folder's training images (:meth:`folder`). ``folder``
    is where they are (results.json's ``learned_on``)."""

    def __init__(self, paths: Sequence[os.PathLike | str], *, root: str | os.PathLike, name: str, folder: str,
                 convention: Any, scales: Sequence[float], min_side: int | None,
                 max_images: int | None = None) -> None:
        paths = list(paths)
        if max_images is not None and len(paths) > max_images:
            paths = [paths[i] for i in np.linspace(0, len(paths) - 1, num=max_images).round().astype(int)]
        super().__init__(paths, root=root, name=name, split="train", convention=convention, scales=scales,
                         min_side=min_side)
        self.folder = folder

    @classmethod
    def builtin(cls, root: str | os.PathLike, name: str, **kw: Any) -> TrainImages:
        """The built-in benchmark's training split ``<root>/<name>_train``."""
        from datasets.synthetic import load_train_split

        paths, _ = load_train_split(root, name)
        return cls(paths, root=root, name=f"{name}_train", folder=os.path.join(os.fspath(root), f"{name}_train"),
                   **kw)

    @classmethod
    def class_folder(cls, folder: str | os.PathLike, **kw: Any) -> TrainImages:
        """Every image under a class folder's training folder (``<class>/<images>``, or loose images)."""
        paths = [os.path.join(folder, *rel.split("/")) for rel, _ in class_images(folder)]
        if not paths:
            raise MissingFileError(f"post.whitening: no images under {folder} to learn the whitening on")
        name = "folder-" + class_folder_title(folder).replace("/", "-")
        return cls(paths, root=folder, name=name, folder=os.fspath(folder), **kw)


@dataclass
class WhiteningContext:
    """What deciding, learning and saving a model's whitening needs: the ``post.whitening`` settings, the weights
    file and its sha256 (None for random weights), the model's state hash, where the training images are (the
    built-in split ``train_name`` under ``root``, or a class folder's ``train_dir``; neither for a run on real
    datasets), the extraction keywords and the feature cache folder."""

    source: str | None
    dim: int | None
    max_images: int | None
    weights_file: str | None
    weights_sha256: str | None
    root: str
    train_name: str | None
    min_side: int | None
    cache_dir: str | None
    depth: int
    extract_kw: Mapping[str, Any]
    train_dir: str | None = None


def whitening_path(ctx: WhiteningContext, kind: str, state_hash: str) -> Path | None:
    """Where the whitening of ``kind`` is saved and looked for: beside the weights file, else in the feature
    cache folder under the model's state hash, else nowhere (learned again each run)."""
    if ctx.weights_file:
        return Path(f"{ctx.weights_file}.whiten-{kind}.pt")
    if ctx.cache_dir:
        return Path(ctx.cache_dir) / "whitening" / f"{kind}-{state_hash[:24]}.pt"
    return None


def whitening_info(saved: Mapping[str, Any], path: str | os.PathLike | None) -> dict[str, Any]:
    """The JSON-ready description of a whitening (for results.json): file, dimension, what it was learned on."""
    return {"file": os.fspath(path) if path else None, "dim": int(saved["projection"].shape[1]),
            "learned_on": saved.get("learned_on"), "n_images": saved.get("n_images"),
            "weights_sha256": saved.get("weights_sha256")}


def _signature_hash(signature: Any) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


def _load(path: Path) -> dict[str, Any]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any way a file can be damaged: name it
        raise ConfigError(f"whitening file {path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                          "learn it again, or give another post.whitening.source") from None
    if not isinstance(saved, Mapping) or not {"mean", "projection"} <= set(saved):
        raise ConfigError(f"whitening file {path} is not a whitening (expected a dict with 'mean' and "
                          "'projection', as models.functional.learn_pca_whitening returns)")
    mean, proj = saved["mean"], saved["projection"]
    if mean.ndim != 1 or proj.ndim != 2 or proj.shape[0] != mean.shape[0]:
        raise ConfigError(f"whitening file {path}: mean {tuple(mean.shape)} and projection {tuple(proj.shape)} "
                          "do not fit together ((d,) and (d, dim))")
    if not (torch.isfinite(mean).all() and torch.isfinite(proj).all()):
        raise ConfigError(f"whitening file {path} holds non-finite values")
    return dict(saved)


def _mismatch(saved: Mapping[str, Any], *, kind: str, state_hash: str, signature: str, dim: int | None,
              train: str | None) -> str | None:
    """Why a saved whitening does not belong to this model (None when it does)."""
    if saved.get("format") != WHITENING_FORMAT:
        return f"format {saved.get('format')} (this version writes {WHITENING_FORMAT})"
    if saved.get("kind") != kind:
        return f"it was learned for {saved.get('kind')}, not {kind}"
    if saved.get("state_hash") != state_hash:
        return "it was learned with other weights"
    if saved.get("model_signature") != signature:
        return "it was learned with other model settings (model.superglobal / model.cvnet_scales)"
    if saved.get("dim_requested") != dim:
        return f"it was learned with post.whitening.dim={saved.get('dim_requested')}, not {dim}"
    if train is not None and saved.get("train_signature") != train:
        return "its training images differ from this run's"
    return None


def _check_given(saved: Mapping[str, Any], path: Path, *, kind: str, d: int, state_hash: str) -> None:
    if saved["mean"].shape[0] != d:
        raise ConfigError(f"whitening file {path} is for {saved['mean'].shape[0]}-d descriptors; {kind}'s are {d}-d")
    if "kind" not in saved:
        logger.warning("whitening file %s records neither its model nor its weights: it cannot be checked against "
                       "%s", path, kind)
        return
    if saved["kind"] != kind:
        raise ConfigError(f"whitening file {path} was learned for {saved['kind']}, not {kind}: give one file per "
                          "model with a '{kind}' placeholder, e.g. post.whitening.source=w/whiten-{kind}.pt")
    if saved.get("state_hash") != state_hash:
        raise ConfigError(f"whitening file {path} was learned with other weights (sha256 "
                          f"{saved.get('weights_sha256') or 'unknown'}) than this run's {kind}")


def check_whitening_source(source: str | None) -> None:
    """A whitening row needs ``post.whitening.source``: refused before anything runs when it is null."""
    if not source:
        raise ConfigError("post.rows asks for whitening but post.whitening.source is null: set it to 'learn' "
                          "(learned on the built-in training split or a class folder's training images, saved beside "
                          "the weights) or to a file saved by an earlier run")


def obtain_whitening(ctx: WhiteningContext, *, kind: str, model: nn.Module, state_hash: str, d: int,
                     scales: Sequence[float], is_main: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The whitening {'mean', 'projection', ...} of global model ``kind`` (descriptors of dimension ``d``, images
    at ``scales`` as the evaluation extracts them) and its :func:`whitening_info`:
    loaded from ``post.whitening.source``, reused from where a run saves it, or learned on the training split and
    saved there. Every rank extracts its share of the training descriptors; only the main rank learns (the
    others get None)."""
    if ctx.source and ctx.source != LEARN:
        path = Path(ctx.source.replace("{kind}", kind))
        if not path.is_file():
            raise MissingFileError(f"post.whitening.source: whitening file {path} not found")
        saved = _load(path)
        _check_given(saved, path, kind=kind, d=d, state_hash=state_hash)
        logger.info("whitening of %s: %s (d=%d)", kind, path, saved["projection"].shape[1])
        return saved, whitening_info(saved, path)
    check_whitening_source(ctx.source)

    path = whitening_path(ctx, kind, state_hash)
    signature = _signature_hash(model_signature(model))
    train_set = None
    kw = {"convention": model.input_convention, "scales": scales, "min_side": ctx.min_side,
          "max_images": ctx.max_images}
    if ctx.train_name:
        train_set = TrainImages.builtin(ctx.root, ctx.train_name, **kw)
    elif ctx.train_dir:
        train_set = TrainImages.class_folder(ctx.train_dir, **kw)
    train = _signature_hash(dataset_signature(train_set)) if train_set is not None else None
    check = {"kind": kind, "state_hash": state_hash, "signature": signature, "dim": ctx.dim, "train": train}
    if path is not None and path.is_file():
        saved = _load(path)
        why = _mismatch(saved, **check)
        if why is None:
            logger.info("whitening of %s: reusing %s (d=%d)", kind, path, saved["projection"].shape[1])
            return saved, whitening_info(saved, path)
        logger.info("whitening of %s: %s does not fit (%s)", kind, path, why)
        if train_set is None:
            raise ConfigError(f"post.whitening.source=learn: the whitening file {path} does not fit this run's "
                              f"{kind} ({why}). {_learn_hint(kind)}")
    if train_set is None:
        where = f"no whitening file at {path}" if path else "no weights file or cache folder to find it in"
        raise ConfigError(f"post.whitening.source=learn learns on the built-in benchmark's training split or on a "
                          "class folder's training images (PATH/training/, or training/ beside PATH), and this run "
                          f"has neither ({where}). {_learn_hint(kind)}")

    vectors = cached_global_descriptors(model=model, dataset=train_set, label=f"{train_set.name}-{kind}-r{ctx.depth}",
                                        weights_hash=state_hash, **ctx.extract_kw)
    if not is_main or vectors is None:
        return None, {}
    try:
        learned = MF.learn_pca_whitening(vectors.double(), ctx.dim)
    except ValueError as exc:  # too few training images for the dimension asked
        raise ConfigError(f"post.whitening: learning on {train_set.name} ({len(train_set)} images): {exc} "
                          "(a larger training split: data.synthetic.config.train_landmarks / "
                          "train_views_per_landmark; or a smaller post.whitening.dim)") from None
    saved = {"mean": learned["mean"].float(), "projection": learned["projection"].float(),
             "format": WHITENING_FORMAT, "kind": kind, "state_hash": state_hash,
             "weights_sha256": ctx.weights_sha256, "weights_file": ctx.weights_file,
             "model_signature": signature, "dim_requested": ctx.dim, "train_signature": train,
             "learned_on": train_set.folder, "n_images": len(train_set)}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(saved, path)
            logger.info("whitening of %s learned on %d images of %s (d=%d), saved to %s", kind, len(train_set),
                        train_set.name, saved["projection"].shape[1], path)
        except OSError as exc:
            logger.warning("whitening of %s: could not save %s (%s); it will be learned again next run",
                           kind, path, exc)
            path = None
    return saved, whitening_info(saved, path)


def _learn_hint(kind: str) -> str:
    return (f"Learn it first with the same model settings on the built-in benchmark (`python eval.py "
            f"model.weights=<the same file> post.rows=[whitening] post.whitening.source=learn`, which saves it "
            f"beside the weights as <weights>.whiten-{kind}.pt), or give post.whitening.source=<file.pt>.")


def whiten(vectors: Tensor, whitening: Mapping[str, Tensor], *, chunk: int = 65536) -> Tensor:
    """``L2((x - m) P)`` of (n, d) descriptors, ``chunk`` rows at a time, in their own dtype (a float16 store of
    the +1M distractors stays float16)."""
    w = {"mean": whitening["mean"], "projection": whitening["projection"]}
    out = [whiten_parts(vectors[s : s + chunk], w).to(vectors.dtype) for s in range(0, vectors.shape[0], chunk)]
    return torch.cat(out) if out else vectors.new_zeros((0, w["projection"].shape[1]))


def post_score_source(row: PostRow) -> str:
    """What the scores shown for a post-processed row are."""
    what = f"cosine similarity of the {'whitened ' if row.whitening else ''}{row.base} descriptors"
    return what + (f", before {row.post.describe()} re-ordered the ranking" if row.post.active else "")


def whiten_descriptors(descriptors: Descriptors, whitening: Mapping[str, Tensor], *, with_distractors: bool,
                       done: Descriptors | None = None) -> Descriptors:
    """The whitened (:func:`whiten`) queries, database and, ``with_distractors``, distractors of ``descriptors``;
    the parts already whitened in ``done`` are reused, so that a dataset's +1M ranking whitens only the
    distractors."""
    done = done or Descriptors(query=None, db=None)

    def part(split: str, wanted: bool = True) -> Tensor | None:
        if getattr(done, split) is not None:
            return getattr(done, split)
        return whiten(getattr(descriptors, split), whitening) if wanted else None

    return Descriptors(query=part("query"), db=part("db"), distractors=part("distractors", with_distractors))


def post_summary(rows: Sequence[PostRow], whitenings: Mapping[str, tuple[Mapping[str, Any] | None, Mapping[str, Any]]]
                 ) -> dict[str, dict[str, Any]]:
    """What each row applied, for results.json: {row key: base, steps, applied (a title), settings}; ``whitenings``
    {kind: (whitening or None, its :func:`whitening_info`)} as :func:`obtain_whitening` gave them."""
    out = {}
    for row in rows:
        saved, info = whitenings.get(row.base, (None, {})) if row.whitening else (None, {})
        out[row.key] = {"base": row.base, "steps": list(row.steps),
                        "applied": row.applied(info.get("dim") if saved is not None else None),
                        "settings": row.settings(info)}
    return out


def rank_post_row(row: PostRow, start: tuple[np.ndarray, Any, Any]) -> np.ndarray:
    """The ranking (n_db, nq) of a post-processed row from ``start`` = (ranks, xq, xb) of its (whitened) global
    ranking; a +1M database (a list of parts) goes through the shortlist mode, reading rows part by part."""
    ranks, xq, xb = start
    if not row.post.active:
        return ranks
    gather = (lambda rows: db_rows(xb, rows)) if isinstance(xb, (list, tuple)) else None
    return postprocess_ranking(xq, xb, ranks, row.post, gather=gather)
