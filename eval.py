"""Evaluate CVNet / SuperGlobal on revisited Oxford and Paris (+1M distractors), on the built-in benchmark, or on a
folder of labelled images.

    python eval.py                                            # built-in synthetic benchmark, no download
    python eval.py --config configs/cvnet_rerank_r50.yaml data.root=/data model.weights=weights/CVPR2022_CVNet_R50.pyth
    torchrun --nproc_per_node 4 eval.py --config configs/superglobal_r101.yaml data.distractors=revisitop1m
    python eval.py --print-config                             # every key with its resolved value
    python eval.py --compare runs/eval/A runs/eval/B          # per-query AP differences between two runs
    python eval.py --config configs/superglobal_r50.yaml "post.rows=[aqe, dba+aqe]" export.ames=ames_data
    python eval.py "data.datasets=[folder:data/shoes/test]" model.weights=weights/CVPR2022_CVNet_R50.pyth

Methods: ``cvnet_global``, ``cvnet_rerank`` (CVNet-Global ranking re-ranked by CVNet-Rerank), ``superglobal``,
``superglobal_rerank``; several in one run share their extracted descriptors, and the on-disk feature cache lets
a later run (or one that adds re-ranking) skip extraction. Output: a Markdown table (mAP Easy / Medium / Hard,
mP@1/5/10) on stdout and, in the run directory (``<output_dir>/<name or timestamp>/``): ``results.json`` (with
per-query APs and top results), ``results.md``, ``report.html`` (one self-contained page: per-query APs sortable by
their change under re-ranking, each query's top results framed by their label, precision-recall curves), the
resolved ``config.yaml`` and PNG result grids. Rows that reproduce a paper row show the paper's figure beside ours.

A class folder ``folder:PATH`` (``PATH/query/<class>/``, ``PATH/gallery/<class>/``, optional ``junk.txt`` and
``query_boxes.csv``: datasets/folder.py) is scored under one protocol: a gallery image of the query's class is a
positive; its table gives mAP, recall@k and mP@k, and its report names each query's class.

Beside the methods: ``post.rows=[aqe, dba+aqe, kreciprocal, whitening, ...]`` adds, for each global ranking, a row
with the field's standard post-processing applied (alpha-QE, alpha-DBA, k-reciprocal re-ranking, learned PCA
whitening), titled by what it applied; ``export.ames=DIR`` writes the SuperGlobal shortlists and descriptors that
AMES and LoCoRe read; ``model.weights_sha256=HEX`` checks the weights file before use (``results.json`` records
the sha256 of every weights file either way).

The keys and their defaults live in ``helpers/schemas.py`` (``EVAL``); the run is ``helpers/evaluation/run.py``,
the report ``helpers/report/write.py``. Torch is imported only once the config has been checked.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from cli import config_arg_parser, config_from_args, repo_path, run_reporting_errors, setup_logging
from helpers.schemas import EVAL

DEFAULT_CONFIG = repo_path(__file__, "configs", "eval_builtin.yaml")


def get_args_parser() -> argparse.ArgumentParser:
    parser = config_arg_parser(
        description="Evaluate CVNet / SuperGlobal on revisited Oxford/Paris (+1M), on a class folder "
                    "(data.datasets=[folder:PATH]), or on the built-in benchmark when run with no arguments.",
        schema=EVAL, default_config=DEFAULT_CONFIG.relative_to(repo_path(__file__)),
        example="model.depth=101 data.root=/data")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                        help="print the per-query AP differences between two run directories (B - A) and exit")
    return parser


def compare(run_a: str, run_b: str) -> int:
    """Print the per-query comparison of two runs; a run that cannot be compared is a one-line error."""
    from helpers.report.compare import CompareError, compare_runs

    try:
        print(compare_runs(run_a, run_b), flush=True)
    except CompareError as exc:
        print(f"{EVAL.name} --compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


def evaluate(cfg: dict[str, Any], *, start: float) -> int:
    """Run the evaluation of a checked config and print its report (rank 0)."""
    from helpers.config import ConfigError, save_resolved
    from helpers.distributed import cleanup_distributed, init_distributed
    from helpers.evaluation.gldv2 import GLDV2_TEST, run_gldv2_evaluation, write_gldv2_report
    from helpers.evaluation.run import run_evaluation
    from helpers.report.write import new_run_dir, write_report

    env = init_distributed(cfg["device"], tf32=bool(cfg.get("tf32")))
    try:
        gldv2 = GLDV2_TEST in cfg["data"]["datasets"]  # a named dataset, whatever data.synthetic says
        if gldv2 and cfg["data"]["datasets"] != [GLDV2_TEST]:
            raise ConfigError(f"{GLDV2_TEST} is evaluated on its own: data.datasets=[{GLDV2_TEST}]")
        outcome = run_gldv2_evaluation(cfg, env=env) if gldv2 else run_evaluation(cfg, env=env)
        if outcome is None or (gldv2 and not env.is_main):  # ranks other than 0 only extract
            return 0
        run_dir = new_run_dir(cfg["output_dir"], cfg["name"])
        save_resolved(cfg, run_dir)
        report = write_gldv2_report if gldv2 else write_report
        print(report(cfg=cfg, outcome=outcome, run_dir=run_dir, start=start), flush=True)
        return 0
    finally:
        cleanup_distributed(env)


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.compare:
        if args.config or args.overrides or args.print_config:
            print(f"{EVAL.name}: error: --compare takes two run directories and nothing else", file=sys.stderr)
            return 2
        return compare(*args.compare)
    cfg = config_from_args(args, EVAL, DEFAULT_CONFIG)
    if isinstance(cfg, int):
        return cfg
    from helpers.distributed import launcher_ranks

    setup_logging(launcher_ranks()[0] == 0)
    return run_reporting_errors(lambda: evaluate(cfg, start=start), name=EVAL.name)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
