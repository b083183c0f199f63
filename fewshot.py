"""Few-shot classification by retrieval on the built-in synthetic landmarks (no download, no training needed), or
on any class folder.

    python fewshot.py                                   # 1 and 5 shots, the built-in training run's weights if any
    python fewshot.py --shots 1 3 5 --model cvnet --weights weights/CVPR2022_CVNet_R50.pyth
    python fewshot.py --folder data/shoes/test/gallery  # any PATH/<class>/<images>

k views per landmark of the built-in test split (landmarks the built-in training never sees), or k images per class
of ``--folder`` (classes with at most k images are left out), are indexed in a
``models.ClassificationByRetrieval``; the other images are classified; top-1 accuracy is averaged over seeded
trials. The work is in ``helpers/fewshot.py``; torch is imported after the arguments are parsed.
"""
from __future__ import annotations

import argparse
import os
import sys

from cli import run_reporting_errors, setup_logging

NAME = "fewshot.py"
BUILTIN_BACKBONE = os.path.join("runs", "builtin", "backbone", "last.pyth")


def _threads(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=NAME, description="Few-shot top-1 accuracy of classification by retrieval "
                                                       "on the built-in synthetic landmarks or a class folder.")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="examples per landmark in the index")
    p.add_argument("--model", default="superglobal",
                   help="superglobal, cvnet (CVNet-Global) or timm:NAME (any timm model: random init, or --weights "
                        "a file of train_backbone.py)")
    p.add_argument("--weights", default=None,
                   help=f"checkpoint (default: the built-in training run's {BUILTIN_BACKBONE} when it exists, "
                        "else random weights)")
    p.add_argument("--depth", type=int, choices=[50, 101], default=50)
    p.add_argument("--folder", default=None,
                   help="a class folder PATH/<class>/<images> to classify instead of the built-in landmarks")
    p.add_argument("--root", default="data", help="where the built-in benchmark is (drawn there if absent)")
    p.add_argument("--name", default="synth")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--k", type=int, default=5, help="neighbours per query")
    p.add_argument("--aggregation", choices=["max", "mean", "sum"], default="max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_threads, default=2,
                   help="torch CPU threads (default 2, as the built-in configs: the count changes the descriptors' "
                        "last bits; 0: torch's default, one per core)")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 float32 matmuls and convolutions on a GPU (faster, ~1e-3 relative error)")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from datasets.synthetic import build_synthetic
    from helpers.builders import build_model
    from helpers.distributed import resolve_device
    from helpers.fewshot import class_folder_views, describe_images, few_shot_accuracy, landmark_views, shot_classes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, tf32=args.tf32)
    if args.folder:
        paths, labels, classes = class_folder_views(args.folder)
        what = f"{len(paths)} images of {len(classes)} classes in {args.folder}"
    else:
        build_synthetic(args.root, name=args.name, progress=False)
        paths, labels = landmark_views(args.root, args.name)
        what = f"{len(paths)} views of {len(set(labels.tolist()))} landmarks"
    for shots in args.shots:  # shots no class can give: refused before the images are described
        shot_classes(labels, shots, skip_small=bool(args.folder))
    if args.model.startswith("timm:"):  # random (no download), or a timm-global file of train_backbone.py
        model = build_model(args.model, weights=args.weights, seed=args.seed, warn_random=False)
        source = args.weights or "random (timm, no download)"
    else:
        weights = args.weights or (BUILTIN_BACKBONE if os.path.isfile(BUILTIN_BACKBONE) else None)
        model = build_model(args.model, depth=args.depth, weights=weights, seed=args.seed)
        source = weights or "RANDOM weights (meaningless: train with train_backbone.py or pass --weights)"
    embeddings = describe_images(model.to(device), paths, device=device)
    print(f"weights: {source}")
    print(f"{what}; {args.trials} trials, k={args.k}, aggregation={args.aggregation}\n")
    print("| shots | top-1 accuracy (%) | std | queries per trial | classes |\n|---|---|---|---|---|")
    for shots in args.shots:
        r = few_shot_accuracy(embeddings, labels, shots, trials=args.trials, seed=args.seed, k=args.k,
                              aggregation=args.aggregation, skip_small=bool(args.folder))
        print(f"| {r.shots} | {100 * r.accuracy:.2f} | {100 * r.std:.2f} | {r.queries_per_trial:.0f} | {r.classes} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    return run_reporting_errors(lambda: run(args), name=NAME)


if __name__ == "__main__":
    sys.exit(main())
