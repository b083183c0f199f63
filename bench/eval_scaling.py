"""The built-in evaluation under 1 and N torchrun ranks: each stage's time as a ratio measured in the same run, and
the figures of both compared.

    python -m bench.eval_scaling                        # CVNet-Global + CVNet re-ranking, built-in benchmark, 2 ranks
    python -m bench.eval_scaling --repeats 3            # 1, N, 1, N, 1, N: medians
    python -m bench.eval_scaling --quick                # a tiny benchmark: a smoke test
    python -m bench.eval_scaling --set "post.rows=[flip, whitening]" --set "methods=[cvnet_global]"

Each run is ``torchrun --standalone --nproc_per_node <1 or N> eval.py`` (gloo on the CPU) with ``OMP_NUM_THREADS=1``
and ``threads=1`` in every rank and a fresh feature cache of its own, so that extraction is measured; the built-in
benchmark is drawn once before the first run. Stage times come from each run's results.json (``timings_s``: rank
0's wall time per stage, which includes its waits for the other ranks). The table gives the median of each side and
their ratio (N ranks / 1 rank; 1/N is a perfect split), with the extraction (every ``extract ...`` and
``whitening ...`` stage) and the CVNet re-ranking (``cvnet_rerank ...``) also summed. The figures of both sides
(every row's mAP and mP@k), their per-query APs, top-k ids and scores must be identical: the bench says which differ
and exits 1 when any does. On a machine shared with other jobs N ranks may not get N cores: the 1-minute load
average before each pair of runs is printed with the table, and the CPU time of all the processes of each side (the
same work split without repeating any gives a ratio of 1.00, whatever the machine's load).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import format_table, machine_info, print_header
from helpers.config import load_config
from helpers.evaluation.data import build_builtin_dataset, resolve_datasets
from helpers.schemas import EVAL

REPO = Path(__file__).resolve().parents[1]
EVAL_SCRIPT = REPO / "eval.py"
EVAL_CONFIG = REPO / "configs" / "eval_builtin.yaml"
#: What the issue measures: CVNet-Global and CVNet re-ranking, no post-processed rows.
DEFAULT_SETS = ("methods=[cvnet_global, cvnet_rerank]", "post.rows=[]")
#: ``--quick``: 3 landmarks of 3 views, 3 distractors and 3 queries of 96 x 64 pixels.
QUICK_SETS = ("data.synthetic.name=synth_tiny",
              "data.synthetic.config={n_landmarks: 3, views_per_landmark: 3, n_distractors: 3, image_size: [96, 64],"
              " train_landmarks: 2, train_views_per_landmark: 2}")
#: The summed rows: name -> what a stage's name starts with.
TOTALS = {"extraction": ("extract ", "whitening "), "CVNet re-ranking": ("cvnet_rerank ",),
          "extraction + re-ranking": ("extract ", "whitening ", "cvnet_rerank ")}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the split run (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, taking turns (default 1)")
    p.add_argument("--quick", action="store_true", help="a tiny built-in benchmark: a smoke test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"an eval.py override for both sides (repeatable; default {' '.join(DEFAULT_SETS)})")
    p.add_argument("--work-dir", default=None, help="where the data, caches and runs go (default: a temporary "
                                                    "folder, removed at the end)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    return p


def eval_command(work: Path, *, ranks: int, name: str, sets: Sequence[str]) -> list[str]:
    """``torchrun`` of eval.py as one side of the bench: its own feature cache and run folder under ``work``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            str(EVAL_SCRIPT), f"data.root={work / 'data'}", f"output_dir={work / 'runs'}",
            f"extraction.cache_dir={work / 'cache' / name}", f"name={name}", "device=cpu", "threads=1",
            "progress=false", *sets]


def run_eval(command: Sequence[str], *, timeout: float) -> float:
    """One run with one OpenMP thread per rank; returns the CPU seconds (user + sys) of all its processes. A failed
    run stops the bench with the last lines of its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"eval.py failed ({' '.join(command[5:])}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_rows(ones: Sequence[Mapping[str, float]], splits: Sequence[Mapping[str, float]]
               ) -> list[tuple[str, float, float]]:
    """(stage, median seconds under 1 rank, median under N) of each stage the runs timed, in the first run's order,
    then the :data:`TOTALS` and the total."""
    names = list(dict.fromkeys([k for t in [*ones, *splits] for k in t if k != "total"]))

    def med(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> float:
        return statistics.median(sum(t.get(k, 0.0) for k in keys) for t in runs)

    rows = [(name, med(ones, [name]), med(splits, [name])) for name in names]
    for total, prefixes in TOTALS.items():
        keys = [n for n in names if n.startswith(prefixes)]
        rows.append((total, med(ones, keys), med(splits, keys)))
    rows.append(("total", med(ones, ["total"]), med(splits, ["total"])))
    return rows


def differences(one: Mapping[str, Any], split: Mapping[str, Any]) -> list[str]:
    """What differs between two runs' results.json: the figures of a (dataset, row), or a row's per-query APs,
    top-k ids or scores; [] when every one is identical."""
    out = []
    for dataset in sorted(set(one["results"]) | set(split["results"])):
        a, b = one["results"].get(dataset, {}), split["results"].get(dataset, {})
        out += [f"{dataset} {row}: figures" for row in sorted(set(a) | set(b)) if a.get(row) != b.get(row)]
    per_a, per_b = one["per_query"]["datasets"], split["per_query"]["datasets"]
    for dataset in sorted(set(per_a) | set(per_b)):
        a, b = per_a.get(dataset, {}).get("methods", {}), per_b.get(dataset, {}).get("methods", {})
        for row in sorted(set(a) | set(b)):
            out += [f"{dataset} {row}: {what}" for what in ("ap", "top_ids", "scores")
                    if a.get(row, {}).get(what) != b.get(row, {}).get(what)]
    return out


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def prepare_data(work: Path, sets: Sequence[str]) -> None:
    """Draw the built-in benchmark the runs evaluate, before any is timed."""
    cfg = load_config(EVAL_CONFIG, [f"data.root={work / 'data'}", *sets], schema=EVAL)
    if resolve_datasets(cfg["data"])[1]:
        build_builtin_dataset(root=str(work / "data"), synthetic=cfg["data"]["synthetic"], progress=False)


def measure(work: Path, *, ranks: int, repeats: int, sets: Sequence[str], timeout: float
            ) -> tuple[list[dict], list[dict], list[tuple[float | None, float | None]]]:
    """The results.json of each run of each side (1 rank, ``ranks``), taking turns, with the CPU seconds of all its
    processes added (``cpu_s``), and the load before each pair of runs."""
    prepare_data(work, sets)
    ones, splits, loads = [], [], []
    for r in range(repeats):
        load = []
        for side, n in (("one", 1), ("split", ranks)):
            load.append(load_average())
            name = f"{side}-{r}"
            cpu = run_eval(eval_command(work, ranks=n, name=name, sets=sets), timeout=timeout)
            results = json.loads((work / "runs" / name / "results.json").read_text())
            (ones if n == 1 else splits).append({**results, "cpu_s": cpu})
        loads.append((load[0], load[1]))
    return ones, splits, loads


def report(ones: Sequence[Mapping[str, Any]], splits: Sequence[Mapping[str, Any]], *, ranks: int) -> list[str]:
    """Print the stage table, the figures and what differs between the sides; returns the differences."""
    rows = stage_rows([r["timings_s"] for r in ones], [r["timings_s"] for r in splits])
    print(format_table(["stage", "1 rank (s)", f"{ranks} ranks (s)", f"ratio ({ranks} / 1)"],
                       [[name, a, b, f"{b / a:.2f}" if a > 0 else "-"] for name, a, b in rows]))
    cpu = [statistics.median(r["cpu_s"] for r in side) for side in (ones, splits)]
    print(f"   CPU time of all processes (user + sys, median): 1 rank {cpu[0]:.1f} s, {ranks} ranks {cpu[1]:.1f} s "
          f"(ratio {cpu[1] / cpu[0]:.2f}: 1.00 is the same work, split without repeating any)")
    figures = [[dataset, row, *(f"{r['mAP'][p]:.2f}" for p in ("easy", "medium", "hard"))]
               for dataset, by_row in ones[0]["results"].items() for row, r in by_row.items()]
    print(format_table(["dataset", "row", "mAP E", "mAP M", "mAP H"], figures))
    found = sorted({d for one in ones for split in splits for d in differences(one, split)})
    if found:
        print(f"   DIFFERENT under {ranks} ranks: " + "; ".join(found))
    else:
        print(f"   identical under {ranks} ranks: every row's figures, per-query APs, top-k ids and scores")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.ranks < 2 or args.repeats < 1:
        raise SystemExit("--ranks must be >= 2 and --repeats >= 1")
    sets = [*DEFAULT_SETS, *(QUICK_SETS if args.quick else ()), *args.set]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="eval-scaling-"))
    try:
        ones, splits, loads = measure(work, ranks=args.ranks, repeats=args.repeats, sets=sets, timeout=args.timeout)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_header(f"Built-in evaluation, 1 rank vs {args.ranks} ranks (torchrun, gloo, one thread each)",
                 machine_info(), {"overrides": " ".join(sets), "repeats": args.repeats,
                                  "load before (1 rank, N ranks)": loads})
    return 1 if report(ones, splits, ranks=args.ranks) else 0


if __name__ == "__main__":
    sys.exit(main())
