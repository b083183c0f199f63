"""Prepare the data and weights: draw the built-in synthetic benchmark, download the benchmarks, write a class
folder in the revisitop layout, fetch the official CVNet weights.

    python prepare_data.py synthetic --root data [--name synth] [--seed N] [--n-landmarks N] [--overwrite] ...
    python prepare_data.py synthetic --root data --class-folder data/synth_classes   # also as a class folder
    python prepare_data.py download --root data --datasets roxford5k rparis6k [revisitop1m] [gldv2-retrieval-test]
                                    [--dry-run]
    python prepare_data.py revisitop data/shoes/test --root data --name shoes [--overwrite]
    python prepare_data.py weights R50 R101 [--root weights] [--url LINK]

The first three write the revisitop layout that eval.py reads (``<root>/<name>/jpg/``,
``<root>/<name>/gnd_<name>.pkl``; GLDv2's retrieval test goes to ``<root>/gldv2``); ``--class-folder`` also writes
the built-in landmarks as ``training/<class>/``, ``test/query/<class>/`` and ``test/gallery/<class>/``
(``eval.py "data.datasets=[folder:data/synth_classes/test]"`` reads it; datasets.synthetic.class_folder), and
``revisitop`` writes a class folder (datasets.folder) in the revisitop layout for tools that read only that layout.
``weights`` downloads
CVPR2022_CVNet_R50/R101.pyth from the authors' Google Drive folder (or R50's mirror), resumable; checks each by a
strict load into CVNet-Rerank and CVNet-Global of its depth; and records its sha256 in ``<root>/SHA256SUMS``,
which every later load checks. The work is done by ``datasets.synthetic.build_synthetic``,
``datasets.download`` and ``models.weights``; errors are one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from cli import run_reporting_errors
from datasets.download import DOWNLOADS

# torch-free: the tables of names are what --datasets and weights accept
from models.weights import CVNET_DRIVE_FOLDER_ID, CVNET_DRIVE_FOLDER_URL, CVNET_REPO_URL, OFFICIAL_WEIGHTS

log = logging.getLogger("prepare_data")

#: The SyntheticConfig fields settable here (dest names equal the field names); the rest keep their defaults.
SYNTHETIC_OPTIONS = ("seed", "n_landmarks", "views_per_landmark", "queries_per_landmark", "n_distractors",
                     "image_size", "train_landmarks", "train_views_per_landmark", "jpeg_quality")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{synthetic,download,revisitop,weights}")

    s = commands.add_parser("synthetic", help="draw the built-in landmark benchmark (no download)",
                            description="Build the built-in synthetic landmark-retrieval benchmark (revisitop "
                                        "layout, no download). Options left out keep the defaults of "
                                        "datasets.synthetic.SyntheticConfig.")
    s.add_argument("--root", default="data", help="folder that will hold <name>/ and <name>_train/ (default: data)")
    s.add_argument("--name", default="synth", help="dataset name (default: synth)")
    for field in SYNTHETIC_OPTIONS:
        if field == "image_size":
            s.add_argument("--image-size", type=int, nargs=2, metavar=("LONG", "SHORT"))
        else:
            s.add_argument("--" + field.replace("_", "-"), type=int)
    s.add_argument("--class-folder", metavar="OUT", default=None,
                   help="also write the benchmark as a class folder: OUT/training/<class>/, OUT/test/query/<class>/, "
                        "OUT/test/gallery/<class>/ (evaluate it with eval.py \"data.datasets=[folder:OUT/test]\")")
    s.add_argument("--overwrite", action="store_true", help="replace an existing build with another config")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")

    d = commands.add_parser("download", help="download revisited Oxford/Paris and the R1M distractors",
                            description="Download revisited Oxford/Paris and the R1M distractors (resumable, "
                                        "extracted in place).")
    d.add_argument("--root", required=True, help="data root (the folder to hold roxford5k/, rparis6k/, ...)")
    d.add_argument("--datasets", nargs="+", default=["roxford5k", "rparis6k"], choices=sorted(DOWNLOADS))
    d.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    d.add_argument("--keep-archives", action="store_true", help="keep the tars after extracting them")
    d.add_argument("--no-verify", action="store_true", help="skip md5 checks of files already present")

    r = commands.add_parser("revisitop", help="write a class folder in the revisitop layout (gnd_<name>.pkl, jpg/)",
                            description="Write the class folder FOLDER (FOLDER/query/<class>/, "
                                        "FOLDER/gallery/<class>/, optional junk.txt and query_boxes.csv; see "
                                        "datasets/folder.py) as "
                                        "ROOT/NAME/gnd_NAME.pkl and ROOT/NAME/jpg/, for tools that read only the "
                                        "revisitop layout: a gallery image of a query's class is one of its 'easy' "
                                        "positives, a listed junk image of it 'junk'.")
    r.add_argument("folder", help="the class folder (the one eval.py reads as folder:FOLDER)")
    r.add_argument("--root", required=True, help="data root that will hold NAME/")
    r.add_argument("--name", required=True, help="dataset name (data.datasets=[NAME] then evaluates it)")
    r.add_argument("--overwrite", action="store_true", help="replace ROOT/NAME when it exists")

    w = commands.add_parser("weights", help="fetch and check the official CVNet weights (R50, R101)",
                            description="Download the official CVNet checkpoints (SuperGlobal uses the same files) "
                                        f"from the Google Drive folder {CVNET_DRIVE_FOLDER_URL} that {CVNET_REPO_URL} "
                                        "links (R50 also from the AMES authors' mirror), resuming an interrupted "
                                        "download; check each by a strict load into CVNet-Rerank and CVNet-Global of "
                                        "its depth; record its sha256 in ROOT/SHA256SUMS, which every later load "
                                        "checks. A file already in ROOT is only checked.")
    w.add_argument("names", nargs="+", type=str.upper, choices=sorted(OFFICIAL_WEIGHTS), metavar="NAME",
                   help=f"which checkpoints: {' '.join(sorted(OFFICIAL_WEIGHTS))}")
    w.add_argument("--root", default="weights", help="folder for the .pyth files (default: weights)")
    w.add_argument("--url", help="fetch the one named file only from here: a Google Drive file or folder link, or "
                                 "any http(s) URL (default: the sources recorded in models/weights.py)")
    w.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a try gives up")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def synthetic(args: argparse.Namespace) -> int:
    from datasets.synthetic import SyntheticConfig, build_synthetic

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    given = {f: getattr(args, f) for f in SYNTHETIC_OPTIONS if getattr(args, f) is not None}
    out = build_synthetic(args.root, name=args.name, config=SyntheticConfig(**given), overwrite=args.overwrite,
                          progress=not args.no_progress)
    c = json.loads((out / "meta.json").read_text())["counts"]
    log.info("test split  %s: %d queries, %d database images (%d easy, %d hard, %d junk, %d distractors); "
             "ground truth %s", out, c["queries"], c["database"], c["easy"], c["hard"], c["junk"],
             c["distractors"], out / f"gnd_{args.name}.pkl")
    train_dir = out.parent / f"{args.name}_train"
    train = json.loads((train_dir / "meta.json").read_text())["counts"]
    log.info("train split %s: %d images of %d landmarks", train_dir, train["images"], train["classes"])
    if args.class_folder:
        from datasets.synthetic.class_folder import write_class_folder

        folder = write_class_folder(args.class_folder, root=args.root, name=args.name, config=SyntheticConfig(**given),
                                    overwrite=args.overwrite, progress=not args.no_progress)
        log.info("class folder %s: evaluate it with python eval.py \"data.datasets=[folder:%s]\"", folder,
                 folder / "test")
    return 0


def revisitop(args: argparse.Namespace) -> int:
    from datasets.folder import write_revisitop

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_revisitop(args.folder, args.root, args.name, overwrite=args.overwrite)
    log.info("evaluate it with python eval.py data.root=%s \"data.datasets=[%s]\"", args.root, out.name)
    return 0


def download(args: argparse.Namespace) -> int:
    from datasets.download import download as run_plan
    from datasets.download import format_plan, plan_downloads

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = plan_downloads(args.root, args.datasets, verify_md5=not args.no_verify)
    print(format_plan(plan))
    if args.dry_run or not plan:
        return 0
    run_plan(plan, root=args.root, keep_archives=args.keep_archives)
    return 0


def verify_official_weights(path: str, depth: int) -> None:
    """Raise unless ``path`` loads strictly into CVNet-Rerank and CVNet-Global of ResNet-``depth`` (between them,
    every tensor of an official file). The file is read once (its recorded sha256 checked); the models are laid out
    on the meta device and given memory without initialising it, since the load overwrites every tensor."""
    import torch

    from models import CVNetGlobal, CVNetRerank, load_official_checkpoint
    from models.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    for cls in (CVNetRerank, CVNetGlobal):
        with torch.device("meta"):
            model = cls(depth=depth)
        load_official_checkpoint(model.to_empty(device="cpu"), checkpoint)


def weights(args: argparse.Namespace) -> int:
    from models.weights import fetch_official_weights

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sums = fetch_official_weights(args.names, root=args.root, url=args.url, folder_id=CVNET_DRIVE_FOLDER_ID,
                                  table=OFFICIAL_WEIGHTS, verify=verify_official_weights, timeout=args.timeout,
                                  progress=not args.no_progress)
    log.info("checked %s; sha256 recorded in %s/SHA256SUMS", ", ".join(sums), args.root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    command = {"synthetic": synthetic, "download": download, "revisitop": revisitop, "weights": weights}[args.command]
    return run_reporting_errors(lambda: command(args), name=f"prepare_data.py {args.command}")


if __name__ == "__main__":
    sys.exit(main())
