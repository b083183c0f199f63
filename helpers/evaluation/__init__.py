"""Evaluation on revisited Oxford / Paris (+1M), GLDv2, the built-in benchmark and class folders (``folder:PATH``).

The run (:func:`helpers.evaluation.run.run_evaluation`) is a sequence of named stages; the metrics live in
``metrics.py`` and are re-exported here::

    from helpers.evaluation import compute_map, gldv2_mean_average_precision
"""
from helpers.evaluation.metrics import (
    CLASS_PROTOCOLS,
    PROTOCOLS,
    build_protocols,
    compute_ap,
    compute_map,
    compute_recall,
    evaluate_revisited,
    format_percent,
    gldv2_global_average_precision,
    gldv2_mean_average_precision,
    mean_precision_recall,
    metrics_percent,
)

__all__ = ["CLASS_PROTOCOLS", "PROTOCOLS", "build_protocols", "compute_ap", "compute_map", "compute_recall",
           "evaluate_revisited", "format_percent",
           "gldv2_global_average_precision", "gldv2_mean_average_precision", "mean_precision_recall",
           "metrics_percent"]
