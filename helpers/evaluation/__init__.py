"""Evaluation on revisited Oxford / Paris (+1M), GLDv2 and the built-in benchmark.

The run (:func:`helpers.evaluation.run.run_evaluation`) is a sequence of named stages; the metrics live in
``metrics.py`` and are re-exported here::

    from helpers.evaluation import compute_map, gldv2_mean_average_precision
"""
from helpers.evaluation.metrics import (
    PROTOCOLS,
    build_protocols,
    compute_ap,
    compute_map,
    evaluate_revisited,
    format_percent,
    gldv2_global_average_precision,
    gldv2_mean_average_precision,
    mean_precision_recall,
    metrics_percent,
)

__all__ = ["PROTOCOLS", "build_protocols", "compute_ap", "compute_map", "evaluate_revisited", "format_percent",
           "gldv2_global_average_precision", "gldv2_mean_average_precision", "mean_precision_recall",
           "metrics_percent"]
