"""The web demo over a saved index: pick or upload a query, optionally crop it, choose the re-ranking and the
post-processing, see the top-k with scores and the time each stage took. ``demo.py`` is its command line; Gradio
is imported here, on use.

Without an index the demo builds a small one from the built-in synthetic benchmark (no download), with the
built-in training run's weights when they exist, else random weights (announced by a banner).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidValueError, shorten
from common.timing import timed

log = logging.getLogger(__name__)

RERANK_CHOICES = ("none", "superglobal", "cvnet")
POST_CHOICES = ("α-QE", "α-DBA", "k-reciprocal")
BUILTIN_WEIGHTS = ("runs/builtin/rerank/last.pyth", "runs/builtin/backbone/last.pyth")


@dataclass
class DemoState:
    """What one demo process serves: the index and its retriever, example queries (path, box or None),
    ``weights`` the index's checkpoint when it moved since the build (``demo.py --weights``), and whether the
    weights are random (the page then shows a banner)."""

    index_dir: Path
    retriever: Any
    examples: list[tuple[str, tuple[float, float, float, float] | None]] = field(default_factory=list)
    random_weights: bool = False
    weights: str | None = None
    _rerankers: dict[str, Any] = field(default_factory=dict)
    _decoded: tuple[tuple[str, int, int], Any] | None = None

    def read_query(self, path: str) -> Any:
        """The query file as uint8 (H, W, 3) BGR, read by the project's one reader (the header's pixel count
        checked against the retriever's ``max_pixels`` before decoding). Decoded once per upload: the preview
        and the search of one file (same path, size and modification time) share one decoding."""
        from helpers.retrieval.images import load_bgr

        stat = os.stat(path)
        key = (os.fspath(path), stat.st_mtime_ns, stat.st_size)
        if self._decoded is None or self._decoded[0] != key:
            self._decoded = None  # a failed read must not leave the previous upload standing in for this one
            self._decoded = (key, load_bgr(path, max_pixels=getattr(self.retriever, "max_pixels", None)))
        return self._decoded[1]

    def use_reranker(self, kind: str) -> None:
        """Make the retriever re-rank with ``kind`` (built once per kind; CVNet's from the index's own weights,
        ``weights`` when they moved, or the index's random seed)."""
        from helpers.retrieval.commands import rerank_source, reranker_for_index

        if kind not in RERANK_CHOICES:
            raise InvalidValueError(f"re-ranking must be one of {RERANK_CHOICES}, got {shorten(kind)}")
        if kind not in self._rerankers:
            source = rerank_source(self.index_dir, weights=self.weights) if kind == "cvnet" else (None, None)
            self._rerankers[kind] = (reranker_for_index(self.index_dir, kind, weights=self.weights), source)
        reranker, (weights, seed) = self._rerankers[kind]
        self.retriever.set_reranker(reranker, weights=weights, seed=seed)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` (original pixels) -> a box, ``""`` -> None; a malformed box is a ValueError."""
    if text is None or not text.strip():
        return None
    try:
        box = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise InvalidValueError(f"the box must be four numbers x1,y1,x2,y2, got {shorten(text)}") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise InvalidValueError("the box must be four numbers x1,y1,x2,y2 with x2 > x1 and y2 > y1, got "
                                f"{shorten(text)}")
    return box  # type: ignore[return-value]


def post_settings(chosen: Sequence[str]) -> Any:
    """The demo's post-processing choices as :class:`helpers.postprocess.PostProcessing` (library defaults)."""
    from helpers.postprocess import PostProcessing

    unknown = [c for c in chosen if c not in POST_CHOICES]
    if unknown:
        raise InvalidValueError(f"unknown post-processing {unknown}; choose among {POST_CHOICES}")
    return PostProcessing(aqe_k=2 if "α-QE" in chosen else 0, dba_k=2 if "α-DBA" in chosen else 0,
                          kreciprocal="k-reciprocal" in chosen, shortlist=100)


def _path_of(image: Any) -> str | None:
    """The file of a Gradio upload or example (a path, or a file object with ``.name`` / ``"path"``)."""
    if image is None or isinstance(image, (str, os.PathLike)):
        return None if image is None else os.fspath(image)
    if isinstance(image, dict):
        return image.get("path")
    return getattr(image, "name", None)


def _gallery(hits: list[Any], max_pixels: int | None = None) -> list[tuple[Any, str]]:
    """(RGB thumbnail, caption ``#rank  score  file name``) of each hit whose image can still be read."""
    from helpers.visualize import format_scores

    scores = format_scores([hit.score for hit in hits])  # digits enough to tell neighbours apart
    gallery = []
    for rank, (hit, score) in enumerate(zip(hits, scores), 1):
        try:
            thumb = thumbnail(hit.path, max_pixels=max_pixels)
        except (OSError, ValueError) as exc:  # a file removed since the build: say so, keep the others
            log.warning("cannot show %s: %s", hit.path, exc)
            continue
        gallery.append((thumb, f"#{rank}  {score}  {Path(hit.path).name}"))
    return gallery


def run_query(state: DemoState, image: Any, box_text: str, rerank: str, post: Sequence[str], k: int
              ) -> tuple[list[tuple[Any, str]], str, str]:
    """(gallery items (RGB thumbnail, caption ``#rank  score  file name``), timings as a Markdown table,
    message). Errors (an unreadable image, a bad box, a re-ranker that cannot be built) come back as the
    message, for the page to show, never as an exception."""
    path = _path_of(image)
    if not path:
        return [], "", "Pick an example or upload a query image first."
    timings: dict[str, float] = {}
    try:
        with timed(timings, "read image"):
            img = state.read_query(path)
        box = parse_box(box_text)
        settings = post_settings(post or [])
        with timed(timings, "load re-ranker"):
            state.use_reranker(rerank)
        hits = state.retriever.query(img, int(k), bbox=box, post=settings, timings=timings)
    except (OSError, ValueError, KeyError) as exc:
        return [], "", f"**Could not run this query:** {exc}"
    with timed(timings, "thumbnails"):
        # entries indexed from arrays have no image to show
        gallery = _gallery([hit for hit in hits if hit.path], getattr(state.retriever, "max_pixels", None))
    lines = ["| stage | ms |", "|---|---:|"] + [f"| {name} | {1000 * t:.1f} |" for name, t in timings.items()]
    lines.append(f"| **total** | **{1000 * sum(timings.values()):.1f}** |")
    applied = settings.describe()
    return gallery, "\n".join(lines), (f"{len(gallery)} results; re-ranking {rerank}; post-processing {applied}")


def preview(image: Any, box_text: str, state: DemoState | None = None) -> Any:
    """The query as the page shows it: an RGB thumbnail with the box drawn, or None (nothing or unreadable).
    With ``state``, the decoded upload is kept for the search (:meth:`DemoState.read_query`)."""
    import cv2

    from helpers.retrieval.images import load_bgr

    path = _path_of(image)
    if not path:
        return None
    try:
        img = (state.read_query(path) if state is not None else load_bgr(path)).copy()
        box = parse_box(box_text)
    except (OSError, ValueError):
        return None
    if box is not None:
        cv2.rectangle(img, (round(box[0]), round(box[1])), (round(box[2]), round(box[3])), (212, 119, 31),
                      max(2, max(img.shape[:2]) // 150))
    return _shrink(img)[:, :, ::-1].copy()


def thumbnail(path: str, side: int = 256, *, max_pixels: int | None = None) -> Any:
    """An RGB uint8 thumbnail (longer side ``side``) of an image file, for the gallery (served from memory, so the
    indexed files need not be exposed by the web server)."""
    from datasets.transforms import read_image

    return _shrink(read_image(path, max_pixels=max_pixels), side)[:, :, ::-1].copy()


def _shrink(img: Any, side: int = 256) -> Any:
    """A BGR image downscaled (INTER_AREA) so that its longer side is at most ``side``."""
    import cv2

    scale = side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    return img


def builtin_index(root: str | os.PathLike, index_dir: str | os.PathLike, *, name: str = "synth",
                  progress: bool = True) -> tuple[Path, list[tuple[str, Any]], str | None]:
    """Build (once) an index of the built-in benchmark's database images; returns (index dir, example queries
    (path, box), weights used or None for random)."""
    from datasets.revisited import RevisitedDataset
    from datasets.synthetic import build_synthetic
    from helpers.retrieval.commands import build_index
    from helpers.retrieval.saved import CONFIG_FILE

    build_synthetic(root, name=name, progress=progress)
    queries = RevisitedDataset(root, name, "query")
    examples = [(os.fspath(p), tuple(float(v) for v in box)) for p, box in zip(queries.image_paths, queries.bbxs)]
    weights = next((w for w in BUILTIN_WEIGHTS if os.path.isfile(w)), None)
    index_dir = Path(index_dir)
    if not (index_dir / CONFIG_FILE).is_file():
        images = Path(root) / name / "jpg"
        database = RevisitedDataset(root, name, "db")
        staging = index_dir.with_name(index_dir.name + ".images")
        staging.mkdir(parents=True, exist_ok=True)
        for path in database.image_paths:  # index the database images only, not the queries
            link = staging / Path(path).name
            if not link.exists():
                link.symlink_to(Path(path).resolve())
        log.info("building the demo index of %d images from %s", len(database), images)
        build_index(images=staging, index_dir=index_dir, weights=weights, progress=progress, overwrite=True)
    return index_dir, examples, weights


def _weights_text(state: DemoState) -> str:
    r = state.retriever
    if r.weights:
        return r.weights
    return f"random (seed {r.seed})" if r.seed is not None else "saved with the index"


def index_examples(retriever: Any, n: int = 4) -> list[tuple[str, None]]:
    """Up to ``n`` indexed image files of ``retriever`` (spread over its ids) as example queries, without box."""
    ids = retriever.database.ids()
    if len(ids) == 0:
        return []
    picks = sorted({int(ids[round(j * (len(ids) - 1) / max(n - 1, 1))]) for j in range(min(n, len(ids)))})
    paths = [(entry or {}).get("path") for entry in retriever.database.get_metadata(picks)]
    return [(p, None) for p in paths if p and os.path.isfile(p)]


def build_app(state: DemoState, *, title: str = "CVNet / SuperGlobal retrieval demo") -> Any:
    """The Gradio Blocks app over ``state``: query file (``#query``), box (``#box``), re-ranking (``#rerank``),
    post-processing (``#post``), top-k (``#topk``), ``#search``; the message (``#message``), the gallery
    (``#results``) and the stage timings (``#timings``). A random-weights index shows ``#random-banner``."""
    import gradio as gr

    from helpers.builders import model_name

    with gr.Blocks(title=title) as app:
        flip = ", flip TTA" if getattr(state.retriever, "flip", False) else ""
        gr.Markdown(f"# {title}\nIndex `{state.index_dir}`: {len(state.retriever)} images, "
                    f"{model_name(state.retriever.model)}{flip}; weights `{_weights_text(state)}`",
                    elem_id="header")
        if state.random_weights:
            gr.HTML("<div id='random-banner' style='background:#fff3cd;border:2px solid #d39e00;padding:8px;"
                    "font-weight:bold;color:#5c4400'>RANDOM WEIGHTS: the rankings below are meaningless. Train "
                    "with the built-in pipeline (python train_backbone.py) or build the index with --weights "
                    "weights/CVPR2022_CVNet_R50.pyth.</div>")
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.File(label="Query image", file_types=["image"],
                                type="filepath", elem_id="query")
                shown = gr.Image(label="Query (box drawn)", interactive=False, height=220, elem_id="query-preview")
                box = gr.Textbox(label="Bounding box x1,y1,x2,y2 (optional, original pixels)", elem_id="box")
                rerank = gr.Radio(list(RERANK_CHOICES), value="none", label="Re-ranking", elem_id="rerank")
                post = gr.CheckboxGroup(list(POST_CHOICES), value=[], label="Post-processing (global shortlist)",
                                        elem_id="post")
                k = gr.Slider(1, 50, value=10, step=1, label="Top-k", elem_id="topk")
                search = gr.Button("Search", variant="primary", elem_id="search")
                if state.examples:
                    gr.Examples([[p, ",".join(f"{v:g}" for v in b) if b else ""] for p, b in state.examples],
                                inputs=[query, box], label="Example queries (click one)", elem_id="examples",
                                example_labels=[Path(p).name + (" (with its box)" if b else "")
                                                for p, b in state.examples])
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(label="Results", columns=5, height="auto", object_fit="contain",
                                     elem_id="results")
                timings = gr.Markdown(elem_id="timings")
        for trigger in (query.change, box.change):
            trigger(lambda image, box_text: preview(image, box_text, state), inputs=[query, box], outputs=shown)
        search.click(lambda *args: run_query(state, *args), inputs=[query, box, rerank, post, k],
                     outputs=[gallery, timings, message])
    return app
