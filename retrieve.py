"""Index a folder of your own images and query it, offline, with no training.

    python retrieve.py build --images photos/ --index my_index --weights weights/CVPR2022_CVNet_R50.pyth
    python retrieve.py query --index my_index --image photos/q.jpg --k 10 --rerank superglobal --grid q.png
    python retrieve.py build --images photos/ --index vit_index --model timm:vit_small_patch16_224 --flip
    python retrieve.py query --index my_index --image photos/q.jpg --aqe 2 --dba 2 --kreciprocal --rerank cvnet

``build`` describes every image under ``--images`` (recursively; jpg, png, bmp, webp, tif, ppm, pgm) with
SuperGlobal (default), CVNet-Global or any timm model (``--model timm:<name>``, random or ``--weights`` a
``timm-global-v1`` file written by train_backbone.py), optionally with flip test-time augmentation, and stores
the descriptors, with each image's path, in ``--index``
(``retriever.json`` + ``database-<save id>.pt`` or ``.faiss``), or in a Pinecone namespace with
``--backend pinecone``. ``query`` prints the ranked list (rank, score, path), optionally post-processed (α-QE,
α-DBA, k-reciprocal over the global shortlist) and re-ranked (SuperGlobal or CVNet, over the post-processed
order), the time of each stage, and can write a PNG grid of the query and its top-k
(:func:`helpers.visualize.save_ranking_grid`; an existing file is replaced only with ``query --overwrite``).
Images whose header announces more than ``--max-pixels`` pixels (default 2**27) are refused before decoding
(skipped and counted with ``--skip-unreadable``); printed paths are escaped (tab, newline, backslash, bytes
that are not UTF-8). The work is done by :func:`helpers.retrieval.commands.build_index` and
:func:`helpers.retrieval.commands.query_index`; torch is imported only once the arguments are parsed.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from cli import run_reporting_errors
from common.errors import InvalidValueError, shorten

NAME = "retrieve.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=NAME, description="Index a folder of your own images and query it (no training needed).")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="describe every image under a folder and save the index")
    b.add_argument("--images", required=True, help="folder of images (searched recursively)")
    b.add_argument("--index", required=True, help="output folder of the index")
    b.add_argument("--model", type=_model, default="superglobal", metavar="{superglobal,cvnet,timm:<name>}",
                   help="global descriptor: superglobal (default), cvnet (CVNet-Global) or timm:<timm model name>")
    b.add_argument("--weights", default=None,
                   help="official checkpoint, e.g. weights/CVPR2022_CVNet_R50.pyth, or for timm:<name> a "
                        "timm-global-v1 file of train_backbone.py (without: random, meaningless)")
    b.add_argument("--flip", action="store_true",
                   help="flip test-time augmentation: L2(desc(image) + desc(mirrored image)), at query time too")
    b.add_argument("--depth", type=int, choices=[50, 101], default=None, help="ResNet depth of the checkpoint (50)")
    b.add_argument("--backend", choices=["tensor", "faiss", "pinecone"], default="tensor",
                   help="vector database (pinecone: needs PINECONE_API_KEY)")
    b.add_argument("--max-side", type=int, default=None,
                   help="downscale images whose longer side exceeds this (INTER_AREA; default 1024); 0 = never")
    b.add_argument("--min-side", type=int, default=None,
                   help="enlarge images whose short side is below this (default 96); 0 = never")
    b.add_argument("--batch-size", type=int, default=None, help="images of equal size described together (4)")
    b.add_argument("--scales", type=_floats, default=None,
                   help="multi-scale factors, e.g. 1 for single scale (default 0.7071,1,1.4142)")
    b.add_argument("--seed", type=int, default=None, help="seed of the random weights used without --weights (0)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index / non-empty namespace")
    b.add_argument("--skip-unreadable", action="store_true",
                   help="skip (and count) images that cannot be read: damaged, truncated, or over --max-pixels")
    b.add_argument("--max-pixels", type=_positive, default=None, metavar="N",
                   help="refuse images whose header announces more than N pixels (default 134217728 = 2**27)")
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
    q.add_argument("--grid", default=None, help="write a PNG (or .jpg) of the query and its top-k here")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    q.add_argument("--max-pixels", type=_positive, default=None, metavar="N",
                   help="refuse images whose header announces more than N pixels (default 134217728 = 2**27)")
    q.add_argument("--weights", default=None, help="the index's checkpoint, if it moved since `build`")
    q.add_argument("--rerank-weights", default=None, help="CVNet re-ranking checkpoint (default: the index's)")
    q.add_argument("--rerank-top-k", type=int, default=None, help="candidates CVNet re-scores (default 100)")
    q.add_argument("--mix", type=_finite, default=None, help="CVNet: global + mix * score (default 0.5)")
    q.add_argument("--sg-m", type=int, default=None, help="SuperGlobal re-ranking: candidates re-ranked (M, 400)")
    q.add_argument("--sg-k", type=int, default=None, help="SuperGlobal re-ranking: neighbours (K, 9)")
    q.add_argument("--sg-beta", type=_non_negative, default=None,
                   help="SuperGlobal re-ranking: neighbour weight (beta, 0.15)")
    p = q.add_argument_group("post-processing of the global shortlist (before any --rerank)")
    p.add_argument("--aqe", type=_count, default=0, metavar="K", help="alpha-QE over the query's top K (0: off)")
    p.add_argument("--aqe-alpha", type=_non_negative, default=3.0, metavar="A",
                   help="alpha-QE exponent (3; 0: average QE)")
    p.add_argument("--dba", type=_count, default=0, metavar="K", help="alpha-DBA over each candidate's top K (0: off)")
    p.add_argument("--dba-alpha", type=_non_negative, default=3.0, metavar="A", help="alpha-DBA exponent (3)")
    p.add_argument("--kreciprocal", action="store_true", help="k-reciprocal re-ranking (Zhong et al. 2017)")
    p.add_argument("--k1", type=_count, default=20, help="k-reciprocal k1 (20)")
    p.add_argument("--k2", type=_count, default=6, help="k-reciprocal k2 (6)")
    p.add_argument("--lambda", dest="lambda_value", type=_unit_interval, default=0.3,
                   help="k-reciprocal lambda in [0, 1] (0.3)")
    p.add_argument("--shortlist", type=_count, default=1000, metavar="N",
                   help="global candidates post-processed per query (1000)")
    _common(q)
    return parser


def _model(text: str) -> str:
    if text in ("superglobal", "cvnet") or (text.startswith("timm:") and len(text) > len("timm:")):
        return text
    raise argparse.ArgumentTypeError(f"expected superglobal, cvnet or timm:<timm model name>, got {shorten(text)}")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {shorten(text)}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {shorten(text)}")
    return value


def _number(text: str, *, low: float = -math.inf, high: float = math.inf, what: str = "a finite number") -> float:
    """A finite float in [low, high]: NaN and inf are refused like any other bad value (``v < low`` is False for
    NaN, so a bare ``float`` would let it through to every score)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {shorten(text)}")
    return value


def _finite(text: str) -> float:
    return _number(text)


def _non_negative(text: str) -> float:
    return _number(text, low=0.0, what="a finite number >= 0")


def _unit_interval(text: str) -> float:
    return _number(text, low=0.0, high=1.0, what="a number in [0, 1]")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {shorten(text)}")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 float32 matmuls and convolutions on a GPU (faster, ~1e-3 relative error)")
    parser.add_argument("--quiet", action="store_true", help="warnings only, no progress bar")


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` -> four floats (None stays None); a malformed or empty box is an InvalidValueError."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise InvalidValueError(f"--bbox must be four numbers x1,y1,x2,y2, got {shorten(text)}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InvalidValueError(f"--bbox {shorten(text)} is empty: need x2 > x1 and y2 > y1")
    return box  # type: ignore[return-value]


def format_hits(hits: Sequence[Any]) -> list[str]:
    """One line per hit: ``rank<TAB>score<TAB>path`` (``id:<id>`` when the entry has no path). The path is
    escaped (:func:`common.io.printable_path`: a tab, newline or backslash as ``\\t``, ``\\n``, ``\\\\``, bytes
    that are not UTF-8 as ``\\xNN``), so that every hit is one line of three fields."""
    from common.io import printable_path

    return [f"{rank}\t{hit.score:.6f}\t{printable_path(hit.path) if hit.path else f'id:{hit.id}'}"
            for rank, hit in enumerate(hits, start=1)]


def _given(**values: Any) -> dict[str, Any]:
    """The options given on the command line (not None): the library's defaults apply to the others."""
    return {name: value for name, value in values.items() if value is not None}


def _sides(args: argparse.Namespace) -> dict[str, int | None]:
    """--max-side / --min-side when given, 0 meaning never (None); absent ones keep the library's defaults."""
    given = _given(max_side=args.max_side, min_side=args.min_side)
    return {name: value or None for name, value in given.items()}


def build(args: argparse.Namespace) -> int:
    from common.io import printable_path
    from helpers.builders import model_name
    from helpers.retrieval.commands import build_index
    from models.weights import OFFICIAL_WEIGHTS_HINT

    retriever = build_index(
        images=args.images, index_dir=args.index, model=args.model, weights=args.weights, backend=args.backend,
        device=args.device, tf32=args.tf32, scales=args.scales, overwrite=args.overwrite,
        skip_unreadable=args.skip_unreadable,
        host=args.host, index_name=args.index_name, namespace=args.namespace, progress=not args.quiet,
        flip=args.flip, max_pixels=args.max_pixels, **_sides(args),
        **_given(depth=args.depth, batch_size=args.batch_size, seed=args.seed))
    print(f"indexed {len(retriever)} images into {printable_path(args.index)} ({args.backend}, "
          f"{model_name(retriever.model)}{', flip TTA' if args.flip else ''})")
    if args.weights is None:
        print("WARNING: built with RANDOM weights, rankings are meaningless. " + OFFICIAL_WEIGHTS_HINT,
              file=sys.stderr)
    return 0


def query(args: argparse.Namespace) -> int:
    bbox = parse_bbox(args.bbox)
    from common.io import printable_path
    from helpers.builders import model_name
    from helpers.postprocess import PostProcessing
    from helpers.retrieval.commands import query_index
    from helpers.retrieval.tiles import write_grid
    from helpers.visualize import check_grid_path

    if args.grid:  # before the work: an existing file, a folder or a format that cannot be written is said now
        check_grid_path(args.grid, overwrite=args.overwrite)
    post = PostProcessing(aqe_k=args.aqe, aqe_alpha=args.aqe_alpha, dba_k=args.dba, dba_alpha=args.dba_alpha,
                          kreciprocal=args.kreciprocal, k1=args.k1, k2=args.k2,
                          lambda_value=args.lambda_value, shortlist=args.shortlist)
    timings: dict[str, float] = {}
    hits, retriever = query_index(
        index_dir=args.index, image=args.image, k=args.k, rerank=args.rerank, bbox=bbox, weights=args.weights,
        rerank_weights=args.rerank_weights, device=args.device, tf32=args.tf32, timings=timings,
        max_pixels=args.max_pixels,
        post=post if post.active else None,  # none asked for: the index's recorded post-processing, if any
        **_given(rerank_top_k=args.rerank_top_k, mix=args.mix, M=args.sg_m, K=args.sg_k, beta=args.sg_beta))
    applied = post if post.active else retriever.post or post
    what = f"{model_name(retriever.model)}{', flip TTA' if retriever.flip else ''}, post-processing " \
           f"{applied.describe()}, rerank {args.rerank}"
    print(f"# query {printable_path(args.image)}: top {len(hits)} of {len(retriever)} ({what})")
    print("# time: " + ", ".join(f"{name} {1000 * t:.1f} ms" for name, t in timings.items()))
    print("# rank\tscore\tpath")
    for line in format_hits(hits):
        print(line)
    if args.grid:
        title = f"{model_name(retriever.model)}  rerank {args.rerank}" + \
            (f"  {applied.describe()}" if applied.active else "")
        written = write_grid(args.grid, args.image, hits, bbox=bbox, title=title, overwrite=args.overwrite,
                             max_pixels=args.max_pixels)
        print(f"# grid written to {printable_path(written)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: build(args) if args.command == "build" else query(args), name=NAME)


if __name__ == "__main__":
    sys.exit(main())
