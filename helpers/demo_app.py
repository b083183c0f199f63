"""The web demo over a saved index: pick or upload a query, optionally crop it, choose the re-ranking and the
post-processing, see the top-k with scores and the time each stage took. ``demo.py`` is its command line; Gradio
is imported here, on use.

Without an index the demo builds a small one from the built-in synthetic benchmark (no download), with the
built-in training run's weights when they exist, else random weights (announced by a banner).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RERANK_CHOICES = ("none", "superglobal", "cvnet")
POST_CHOICES = ("α-QE", "α-DBA", "k-reciprocal")
BUILTIN_WEIGHTS = ("runs/builtin/rerank/last.pyth", "runs/builtin/backbone/last.pyth")


@dataclass
class DemoState:
    """What one demo process serves: the index and its retriever, example queries, the weights' description."""

    index_dir: Path
    retriever: Any
    examples: list[tuple[str, tuple[float, float, float, float] | None]] = field(default_factory=list)
    random_weights: bool = False
    weights: str | None = None
    _rerankers: dict[str, Any] = field(default_factory=dict)

    def reranker(self, kind: str) -> Any:
        """The re-ranker of ``kind`` for this index, built once (CVNet's from the index's own weights)."""
        from helpers.retrieval import reranker_for_index

        if kind == "none":
            return None
        if kind not in self._rerankers:
            self._rerankers[kind] = reranker_for_index(self.index_dir, kind)
        return self._rerankers[kind]


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` (original pixels) -> a box, ``""`` -> None; a malformed box is a ValueError."""
    if text is None or not text.strip():
        return None
    try:
        box = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise ValueError(f"the box must be four numbers x1,y1,x2,y2, got {text!r}") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"the box must be four numbers x1,y1,x2,y2 with x2 > x1 and y2 > y1, got {text!r}")
    return box  # type: ignore[return-value]


def post_settings(chosen: Sequence[str]) -> Any:
    """The demo's post-processing choices as :class:`helpers.postprocess.PostProcessing` (library defaults)."""
    from helpers.postprocess import PostProcessing

    unknown = [c for c in chosen if c not in POST_CHOICES]
    if unknown:
        raise ValueError(f"unknown post-processing {unknown}; choose among {POST_CHOICES}")
    return PostProcessing(aqe_k=2 if "α-QE" in chosen else 0, dba_k=2 if "α-DBA" in chosen else 0,
                          kreciprocal="k-reciprocal" in chosen, shortlist=100)


def run_query(state: DemoState, image: str | None, box_text: str, rerank: str, post: Sequence[str], k: int
              ) -> tuple[list[tuple[str, str]], str, str]:
    """(gallery items (image path, caption), timings as Markdown, message). Errors come back as the message,
    for the page to show, never as an exception."""
    from helpers.retrieval import load_bgr

    if not image:
        return [], "", "Pick an example or upload a query image first."
    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        img = load_bgr(image)
        timings["read image"] = time.perf_counter() - start
        box = parse_box(box_text)
        if rerank not in RERANK_CHOICES:
            raise ValueError(f"re-ranking must be one of {RERANK_CHOICES}, got {rerank!r}")
        start = time.perf_counter()
        reranker = state.reranker(rerank)
        timings["load re-ranker"] = time.perf_counter() - start
        state.retriever.reranker = reranker
        hits = state.retriever.query(img, int(k), bbox=box, post=post_settings(post), timings=timings)
    except (OSError, ValueError) as exc:
        return [], "", f"**Could not run this query:** {exc}"
    start = time.perf_counter()
    gallery = [(thumbnail(hit.path), f"#{rank}  {hit.score:.4f}  {Path(hit.path).name}")
               for rank, hit in enumerate(hits, 1) if hit.path]  # entries indexed from arrays have no image
    timings["thumbnails"] = time.perf_counter() - start
    lines = ["| stage | ms |", "|---|---|"] + [f"| {name} | {1000 * t:.1f} |" for name, t in timings.items()]
    lines.append(f"| **total** | **{1000 * sum(timings.values()):.1f}** |")
    return gallery, "\n".join(lines), f"{len(hits)} results"


def thumbnail(path: str, side: int = 256) -> Any:
    """An RGB uint8 thumbnail (longer side ``side``) of an image file, for the gallery (served from memory, so the
    indexed files need not be exposed by the web server)."""
    import cv2

    from datasets.transforms import read_image

    img = read_image(path)
    scale = side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    return img[:, :, ::-1].copy()


def builtin_index(root: str | os.PathLike, index_dir: str | os.PathLike, *, name: str = "synth",
                  progress: bool = True) -> tuple[Path, list[tuple[str, Any]], str | None]:
    """Build (once) an index of the built-in benchmark's database images; returns (index dir, example queries
    (path, box), weights used or None for random)."""
    from datasets.revisited import RevisitedDataset
    from datasets.synthetic import build_synthetic
    from helpers.retrieval import CONFIG_FILE, build_index

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


def build_app(state: DemoState, *, title: str = "CVNet / SuperGlobal retrieval demo") -> Any:
    """The Gradio Blocks app over ``state``."""
    import gradio as gr

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nIndex: `{state.index_dir}` ({len(state.retriever)} images, "
                    f"{type(state.retriever.model).__name__}); weights: `{state.weights or 'random'}`")
        if state.random_weights:
            gr.Markdown("<div id='random-banner' style='background:#fff3cd;border:2px solid #d39e00;padding:8px;"
                        "font-weight:bold'>RANDOM WEIGHTS: the rankings below are meaningless. Train with the "
                        "built-in pipeline or build the index with --weights weights/CVPR2022_CVNet_R50.pyth."
                        "</div>")
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(type="filepath", label="Query image", sources=["upload"], elem_id="query")
                box = gr.Textbox(label="Bounding box x1,y1,x2,y2 (optional, original pixels)", elem_id="box")
                rerank = gr.Radio(list(RERANK_CHOICES), value="none", label="Re-ranking", elem_id="rerank")
                post = gr.CheckboxGroup(list(POST_CHOICES), value=[], label="Post-processing", elem_id="post")
                k = gr.Slider(1, 50, value=10, step=1, label="Top-k", elem_id="topk")
                search = gr.Button("Search", variant="primary", elem_id="search")
                if state.examples:
                    gr.Examples([[p, ",".join(f"{v:g}" for v in b) if b else ""] for p, b in state.examples],
                                inputs=[query, box], label="Example queries (with their boxes)",
                                elem_id="examples")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(label="Results", columns=5, height="auto", elem_id="results")
                timings = gr.Markdown(elem_id="timings")
        search.click(lambda *args: run_query(state, *args), inputs=[query, box, rerank, post, k],
                     outputs=[gallery, timings, message])
    return app
