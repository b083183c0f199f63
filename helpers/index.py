"""Index a folder of your own images and query it, offline, with no training: ``python -m helpers.index``.

    python -m helpers.index build --images photos/ --index my_index --weights weights/CVPR2022_CVNet_R50.pyth
    python -m helpers.index query --index my_index --image photos/q.jpg --k 10 --rerank superglobal --grid q.png

``build`` describes every image under ``--images`` (recursively; jpg, png, bmp, webp, tif, ppm, pgm) with
SuperGlobal (default) or CVNet-Global and stores the descriptors, with each image's path, in ``--index``
(``retriever.json`` + ``database.pt`` or ``database.faiss``), or in a Pinecone namespace with
``--backend pinecone``. ``query`` prints the ranked list (rank, score, path), optionally re-ranked, and can
write a PNG grid of the query and its top-k. The work is done by :func:`build_index` and :func:`query_index`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.folder import IMAGE_EXTENSIONS
from helpers.retrieval import (
    CONFIG_FILE,
    DEFAULT_MAX_SIDE,
    DEFAULT_MIN_SIDE,
    Hit,
    Retriever,
    build_global_model,
    build_reranker,
    descriptor_dim,
    load_bgr,
)
from helpers.vector_db.base import AbstractVectorDB
from models.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

_TILE = 160
_CAPTION = 22
_PAD = 4


# --------------------------------------------------------------------------------------------------------------
# Library functions behind the two commands
# --------------------------------------------------------------------------------------------------------------


def list_images(
    root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Image files under ``root`` (recursive, extension case-insensitive, sorted), skipping anything under
    ``exclude`` (the index folder, when it lies inside the image folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    skip = Path(exclude).resolve() if exclude is not None else None
    files = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in exts:
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(exts)}) found under {root}")
    return files


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` -> four floats (None stays None)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"--bbox must be four numbers x1,y1,x2,y2, got {text!r}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"--bbox {text!r} is empty: need x2 > x1 and y2 > y1")
    return box  # type: ignore[return-value]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_database(
    backend: str,
    dim: int,
    *,
    host: str | None = None,
    index_name: str | None = None,
    namespace: str = "",
) -> AbstractVectorDB:
    """An empty local database (``"tensor"``, ``"faiss"``) or a Pinecone namespace (``"pinecone"``; API key
    from ``PINECONE_API_KEY``, host / index name from the arguments or ``PINECONE_HOST`` / ``PINECONE_INDEX``)."""
    if backend == "tensor":
        from helpers.vector_db.tensor import TensorVectorDB

        return TensorVectorDB(dim)
    if backend == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        return FaissVectorDB(dim, index="flat")
    if backend == "pinecone":
        from helpers.vector_db.pinecone import PineconeVectorDB

        return PineconeVectorDB(dim, index_name=index_name, host=host, namespace=namespace)
    raise ValueError(f"backend must be 'tensor', 'faiss' or 'pinecone', got {backend!r}")


def build_index(
    *,
    images: str | os.PathLike,
    index_dir: str | os.PathLike,
    model: str = "superglobal",
    weights: str | os.PathLike | None = None,
    depth: int = 50,
    backend: str = "tensor",
    max_side: int | None = DEFAULT_MAX_SIDE,
    min_side: int | None = DEFAULT_MIN_SIDE,
    device: str = "cpu",
    batch_size: int = 4,
    seed: int = 0,
    scales: Sequence[float] | None = None,
    overwrite: bool = False,
    skip_unreadable: bool = False,
    host: str | None = None,
    index_name: str | None = None,
    namespace: str = "",
    progress: bool = True,
) -> Retriever:
    """Index every image under ``images`` into ``index_dir`` (ids 0..n-1 in sorted path order); returns the
    :class:`Retriever`. Without ``weights`` the model is random (seeded, loudly warned: results meaningless).

    ``scales``: the multi-scale factors (default: the model's, 0.7071, 1, 1.4142; ``[1.0]`` is single scale,
    about 3.5 times faster). An unreadable image is an error naming it, unless ``skip_unreadable``. An existing
    index is replaced only with ``overwrite`` (for Pinecone: a namespace that already holds vectors).
    """
    index_dir = Path(index_dir)
    if (index_dir / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{index_dir} already holds an index: pass --overwrite to replace it")
    files = list_images(images, exclude=index_dir)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}. {_weights_hint()}")
    options = {"scales": list(scales)} if scales is not None and model == "superglobal" else None
    net = build_global_model(model, depth=depth, weights=weights, seed=seed, options=options)
    extra = {"scales": tuple(scales)} if scales is not None and model == "cvnet" else {}
    database = make_database(backend, descriptor_dim(net), host=host, index_name=index_name, namespace=namespace)
    if len(database):
        if not overwrite:
            raise FileExistsError(f"the {backend} database already holds {len(database)} vectors: pass --overwrite "
                                  "to delete them first, or use another --namespace")
        database.delete(database.ids())
    retriever = Retriever(net, database, device=resolve_device(device), batch_size=batch_size, max_side=max_side,
                          min_side=min_side, weights=weights, seed=None if weights is not None else seed, **extra)
    logger.info("indexing %d images from %s with %s (ResNet-%d)", len(files), images, type(net).__name__, depth)
    ids = retriever.index(files, ids=range(len(files)), on_error="skip" if skip_unreadable else "raise",
                          progress=progress)
    if int((ids >= 0).sum()) == 0:
        raise ValueError(f"none of the {len(files)} images under {images} could be read")
    retriever.save(index_dir, remote={"host": host, "index_name": index_name} if backend == "pinecone" else None)
    return retriever


def query_index(
    *,
    index_dir: str | os.PathLike,
    image: str | os.PathLike,
    k: int = 10,
    rerank: str = "none",
    bbox: Sequence[float] | None = None,
    weights: str | os.PathLike | None = None,
    rerank_weights: str | os.PathLike | None = None,
    device: str = "cpu",
    rerank_top_k: int | None = None,
    mix: float | None = None,
    M: int = 400,
    K: int = 9,
    beta: float = 0.15,
) -> tuple[list[Hit], Retriever]:
    """Query a saved index with one image: (hits best first, the retriever).

    ``rerank``: ``"none"``, ``"superglobal"`` (M, K, beta) or ``"cvnet"`` (its weights: ``rerank_weights``, else
    the checkpoint the index was built with, which holds both parts, else random like the index's model).
    ``weights`` points at the index's checkpoint if it moved since the build.
    """
    config = Retriever.read_config(index_dir)
    recorded = config["model"]
    source = weights if weights is not None else recorded.get("weights")
    reranker = build_reranker(rerank, depth=recorded["depth"], weights=rerank_weights or source,
                              seed=recorded.get("seed") or 0, M=M, K=K, beta=beta)
    settings: dict[str, Any] = {}
    if rerank_top_k is not None:
        settings["rerank_top_k"] = rerank_top_k
    if mix is not None:
        settings["mix"] = mix
    retriever = Retriever.load(index_dir, weights=weights, reranker=reranker, device=resolve_device(device),
                               **settings)
    return retriever.query(image, k, bbox=bbox), retriever


# --------------------------------------------------------------------------------------------------------------
# Result grid
# --------------------------------------------------------------------------------------------------------------


def fit_thumbnail(img: np.ndarray, size: int = _TILE) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): resized to fit (aspect kept; INTER_AREA shrinking, INTER_LINEAR
    enlarging), centred on black."""
    import cv2

    h, w = img.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    thumb = cv2.resize(img, dsize=(new_w, new_h), interpolation=interp)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    y, x = (size - new_h) // 2, (size - new_w) // 2
    out[y : y + new_h, x : x + new_w] = thumb
    return out


def tile_origin(index: int, *, cols: int, tile: int = _TILE) -> tuple[int, int]:
    """Top-left (y, x) of tile ``index``'s thumbnail in a grid made by :func:`make_grid`."""
    row, col = divmod(index, cols)
    return _PAD + row * (tile + _CAPTION + _PAD), _PAD + col * (tile + _PAD)


def make_grid(
    images: Sequence[np.ndarray | None], captions: Sequence[str], *, cols: int = 6, tile: int = _TILE
) -> np.ndarray:
    """A uint8 BGR grid of thumbnails (``None`` -> a grey tile), each with its caption below, row-major."""
    import cv2

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    grid = np.full((_PAD + rows * (tile + _CAPTION + _PAD), _PAD + cols * (tile + _PAD), 3), 32, dtype=np.uint8)
    for i, (img, caption) in enumerate(zip(images, captions)):
        y, x = tile_origin(i, cols=cols, tile=tile)
        grid[y : y + tile, x : x + tile] = fit_thumbnail(img, tile) if img is not None else 96
        cv2.putText(grid, caption[:24], (x + 2, y + tile + _CAPTION - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return grid


def write_grid(
    path: str | os.PathLike,
    query: str | os.PathLike,
    hits: Sequence[Hit],
    *,
    bbox: Sequence[float] | None = None,
    cols: int = 6,
) -> Path:
    """Write a PNG of the query (its box drawn in green) followed by its hits' images."""
    import cv2

    query_img = load_bgr(query).copy()
    if bbox is not None:
        x1, y1, x2, y2 = (int(v) for v in bbox)
        cv2.rectangle(query_img, (x1, y1), (x2, y2), (0, 255, 0), max(2, max(query_img.shape[:2]) // 200))
    images: list[np.ndarray | None] = [query_img]
    for hit in hits:
        try:
            images.append(load_bgr(hit.path) if hit.path else None)
        except (OSError, ValueError) as exc:
            logger.warning("grid: cannot show id %d: %s", hit.id, exc)
            images.append(None)
    captions = ["query"] + [f"#{r} {h.score:.3f}" for r, h in enumerate(hits, start=1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), make_grid(images, captions, cols=cols)):
        raise OSError(f"could not write the grid image {path} (use a .png or .jpg name)")
    return path


def format_hits(hits: Sequence[Hit]) -> list[str]:
    """One line per hit: ``rank<TAB>score<TAB>path`` (``id:<id>`` when the entry has no path)."""
    return [f"{rank}\t{hit.score:.6f}\t{hit.path or f'id:{hit.id}'}" for rank, hit in enumerate(hits, start=1)]


def _weights_hint() -> str:
    return ("The official weights are CVPR2022_CVNet_R50.pyth / CVPR2022_CVNet_R101.pyth from the CVNet release "
            "(https://github.com/sungonce/CVNet, Google Drive links in its README): put them under weights/.")


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.index",
        description="Index a folder of your own images and query it (no training needed).")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="describe every image under a folder and save the index")
    b.add_argument("--images", required=True, help="folder of images (searched recursively)")
    b.add_argument("--index", required=True, help="output folder of the index")
    b.add_argument("--model", choices=["superglobal", "cvnet"], default="superglobal",
                   help="global descriptor (default: superglobal)")
    b.add_argument("--weights", default=None,
                   help="official checkpoint, e.g. weights/CVPR2022_CVNet_R50.pyth (without: random, meaningless)")
    b.add_argument("--depth", type=int, choices=[50, 101], default=50, help="ResNet depth of the checkpoint")
    b.add_argument("--backend", choices=["tensor", "faiss", "pinecone"], default="tensor",
                   help="vector database (pinecone: needs PINECONE_API_KEY)")
    b.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help="downscale images whose longer side exceeds this (INTER_AREA); 0 = never")
    b.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, help="enlarge images whose short side is below")
    b.add_argument("--batch-size", type=int, default=4, help="images of equal size described together")
    b.add_argument("--scales", type=_floats, default=None,
                   help="multi-scale factors, e.g. 1 for single scale (default 0.7071,1,1.4142)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights used without --weights")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index / non-empty namespace")
    b.add_argument("--skip-unreadable", action="store_true", help="skip (and log) images that cannot be read")
    b.add_argument("--host", default=None, help="Pinecone index host (or env PINECONE_HOST)")
    b.add_argument("--index-name", default=None, help="Pinecone index name (or env PINECONE_INDEX)")
    b.add_argument("--namespace", default="", help="Pinecone namespace")
    _common(b)

    q = sub.add_parser("query", help="rank the indexed images for one query image")
    q.add_argument("--index", required=True, help="folder written by `build`")
    q.add_argument("--image", required=True, help="query image")
    q.add_argument("--k", type=int, default=10, help="results to print")
    q.add_argument("--rerank", choices=["none", "superglobal", "cvnet"], default="none")
    q.add_argument("--bbox", default=None, help="query box x1,y1,x2,y2 in the image's pixels")
    q.add_argument("--grid", default=None, help="write a PNG of the query and its top-k here")
    q.add_argument("--weights", default=None, help="the index's checkpoint, if it moved since `build`")
    q.add_argument("--rerank-weights", default=None, help="CVNet re-ranking checkpoint (default: the index's)")
    q.add_argument("--rerank-top-k", type=int, default=None, help="candidates CVNet re-scores (default 100)")
    q.add_argument("--mix", type=float, default=None, help="CVNet: global + mix * score (default 0.5)")
    q.add_argument("--sg-m", type=int, default=400, help="SuperGlobal re-ranking: candidates re-ranked (M)")
    q.add_argument("--sg-k", type=int, default=9, help="SuperGlobal re-ranking: neighbours (K)")
    q.add_argument("--sg-beta", type=float, default=0.15, help="SuperGlobal re-ranking: neighbour weight (beta)")
    _common(q)
    return parser


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--quiet", action="store_true", help="warnings only, no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            retriever = build_index(
                images=args.images, index_dir=args.index, model=args.model, weights=args.weights, depth=args.depth,
                backend=args.backend, max_side=args.max_side or None, min_side=args.min_side or None,
                device=args.device, batch_size=args.batch_size, seed=args.seed, scales=args.scales,
                overwrite=args.overwrite,
                skip_unreadable=args.skip_unreadable, host=args.host, index_name=args.index_name,
                namespace=args.namespace, progress=not args.quiet)
            print(f"indexed {len(retriever)} images into {args.index} ({args.backend}, "
                  f"{type(retriever.model).__name__} ResNet-{args.depth})")
            if args.weights is None:
                print("WARNING: built with RANDOM weights, rankings are meaningless. " + _weights_hint(),
                      file=sys.stderr)
            return 0
        bbox = parse_bbox(args.bbox)
        hits, retriever = query_index(
            index_dir=args.index, image=args.image, k=args.k, rerank=args.rerank, bbox=bbox, weights=args.weights,
            rerank_weights=args.rerank_weights, device=args.device, rerank_top_k=args.rerank_top_k, mix=args.mix,
            M=args.sg_m, K=args.sg_k, beta=args.sg_beta)
        print(f"# query {args.image}: top {len(hits)} of {len(retriever)} ({type(retriever.model).__name__}, "
              f"rerank {args.rerank})")
        print("# rank\tscore\tpath")
        for line in format_hits(hits):
            print(line)
        if args.grid:
            print(f"# grid written to {write_grid(args.grid, args.image, hits, bbox=bbox)}")
        return 0
    except (OSError, ValueError, KeyError, ImportError, CheckpointError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
