"""A web demo (Gradio) over a saved index: pick or upload a query, optionally give a box, choose the re-ranking and
post-processing, see the top-k with scores and the time each stage took.

    python demo.py                                   # builds a small index of the built-in benchmark (no download)
    python demo.py --index indexes/photos            # an index written by `python retrieve.py build`
    python demo.py --index indexes/photos --port 7861 --host 0.0.0.0    # listen beyond this machine (careful)

It listens on 127.0.0.1 by default. The app is ``helpers/retrieval/demo_app.py``; torch and gradio are imported
after the arguments are parsed.
"""
from __future__ import annotations

import argparse
import os
import sys

from cli import run_reporting_errors, setup_logging

NAME = "demo.py"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=NAME, description="Web demo of retrieval with re-ranking over an index.")
    p.add_argument("--index", default=None,
                   help="index folder (retrieve.py build); default: build runs/demo/index from the built-in benchmark")
    p.add_argument("--root", default="data", help="where the built-in benchmark is drawn (without --index)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--weights", default=None, help="the index's weights file if it moved since the build")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 float32 matmuls and convolutions on a GPU (faster, ~1e-3 relative error)")
    return p


def run(args: argparse.Namespace) -> int:
    from helpers.distributed import resolve_device
    from helpers.retrieval.demo_app import DemoState, build_app, builtin_index, index_examples
    from helpers.retrieval.retriever import Retriever

    if args.index:
        index_dir, examples = args.index, None
    else:
        index_dir, examples, _ = builtin_index(args.root, os.path.join("runs", "demo", "index"))
    retriever = Retriever.load(index_dir, weights=args.weights, device=resolve_device(args.device, tf32=args.tf32))
    if examples is None:  # a few indexed images to click (each finds itself first)
        examples = index_examples(retriever)
    state = DemoState(index_dir=index_dir, retriever=retriever, examples=examples, weights=args.weights,
                      random_weights=retriever.weights is None and retriever.seed is not None)
    app = build_app(state)
    print(f"{NAME}: serving {index_dir} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    # only the example queries are served from disk; results are sent as in-memory thumbnails
    app.launch(server_name=args.host, server_port=args.port, allowed_paths=[p for p, _ in examples],
               show_error=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    return run_reporting_errors(lambda: run(args), name=NAME)


if __name__ == "__main__":
    sys.exit(main())
