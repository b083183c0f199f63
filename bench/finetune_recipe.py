"""The reference CLIP retrieval system's fine-tuning recipe (``configs/finetune_folder.yaml``) measured on a class
folder drawn from the built-in synthetic landmarks: retrieval mAP on held-out landmarks before and after.

    python -m bench.finetune_recipe --root /tmp/ft                        # tiny ViT, random start, 300 steps
    python -m bench.finetune_recipe --root /tmp/ft --objective cvnet      # the same with CVNet's losses

Draws the synthetic set (no download) and writes ``<root>/folder/training/<landmark>/`` (the first
``--train-classes`` training landmarks) and ``<root>/folder/test/{query,gallery}/<landmark>/`` (the other
landmarks: ``--queries`` views each as queries, the rest as the gallery), issue 20's layout. Fine-tunes with the
recipe's config and the overrides a small model at small images on a CPU needs (printed), then describes the
held-out queries and gallery (each image resized to the training size, one scale) and prints mAP and recall@1 of
the model it started from and of the fine-tuned one, with the wall times.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datasets.augment import resize_to
from datasets.synthetic import SyntheticConfig, build_synthetic, load_train_split
from datasets.transforms import read_image, to_tensor
from helpers.config import load_config
from helpers.distributed import DistEnv
from helpers.evaluation.metrics import compute_map
from helpers.schemas import TRAIN_BACKBONE
from helpers.training.backbone import build_global_model, train_backbone
from models.timm_global import load_timm_global

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune_folder.yaml"


def write_class_folder(synth_root: Path, name: str, out: Path, *, train_classes: int,
                       queries: int) -> dict[str, int]:
    """``out/training/<lm>/`` for the first ``train_classes`` landmarks of the synthetic training split,
    ``out/test/query/<lm>/`` (``queries`` views) and ``out/test/gallery/<lm>/`` (the rest) for the others."""
    paths, labels = load_train_split(synth_root, name)
    if out.exists():
        shutil.rmtree(out)
    counts = {"training": 0, "query": 0, "gallery": 0}
    seen: dict[int, int] = {}
    for path, label in zip(paths, labels):
        order = seen[label] = seen.get(label, -1) + 1
        part = "training" if label < train_classes else ("test/query" if order < queries else "test/gallery")
        folder = out / part / f"lm{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)
        counts[part.rsplit("/", 1)[-1]] += 1
    return counts


def _listing(folder: Path) -> tuple[list[Path], list[str]]:
    files = sorted(folder.glob("*/*.jpg"))
    return files, [f.parent.name for f in files]


@torch.inference_mode()
def describe(model: nn.Module, files: Sequence[Path], size: int, batch: int = 64) -> torch.Tensor:
    """(N, D) descriptors of ``files``, each resized to ``size`` x ``size`` in the model's input convention."""
    model.eval()
    out = []
    for start in range(0, len(files), batch):
        images = [to_tensor(resize_to(read_image(f), size), model.input_convention) for f in files[start:start + batch]]
        out.append(model(torch.stack(images)))
    return torch.cat(out)


def retrieval_figures(model: nn.Module, test: Path, size: int) -> dict[str, float]:
    """mAP (revisitop's AP, every gallery image of the query's landmark positive) and recall@1 of the queries of
    ``test/query`` against ``test/gallery``, in %."""
    qfiles, qlabels = _listing(test / "query")
    gfiles, glabels = _listing(test / "gallery")
    xq, xb = describe(model, qfiles, size), describe(model, gfiles, size)
    ranks = torch.argsort(xb @ xq.T, dim=0, descending=True).numpy()  # (nb, nq)
    glabels_arr = np.array(glabels)
    gnd = [{"ok": np.flatnonzero(glabels_arr == label), "junk": np.array([], dtype=np.int64)} for label in qlabels]
    mean_ap = compute_map(ranks, gnd)[0]
    recall1 = float(np.mean([glabels_arr[ranks[0, i]] == label for i, label in enumerate(qlabels)]))
    return {"mAP": round(100 * mean_ap, 2), "R@1": round(100 * recall1, 2), "queries": len(qfiles),
            "gallery": len(gfiles)}


def _overrides(args: argparse.Namespace, folder: Path) -> list[str]:
    """What a small model on a CPU changes in the recipe's config (the rest is the recipe's)."""
    common = [f"run.out_dir={args.root / ('run_' + args.objective)}", f"model.arch={args.arch}",
              "model.imagenet_weights=false", f"data.root={folder / 'training'}", f"data.image_size={args.image_size}",
              f"train.steps={args.steps}", "train.epochs=null", f"train.batch_size={args.batch}", "train.device=cpu",
              f"train.num_workers={args.workers}", f"train.threads={args.threads}", f"optim.lr={args.lr}",
              f"train.checkpoint_every={args.steps}", "train.log_every=10"]
    if args.objective == "circle":
        return [*common, f"data.sampler.k={args.k}"]
    # CVNet's losses on the same model, head and optimisation: pairs in the shuffled order, no miner
    return [*common, "loss.name=cvnet", "data.sampler.name=random", "loss.miner.name=null",
            "loss.queue_size=1024", "loss.key_momentum=0.99"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="where the data, the folder and the runs go")
    parser.add_argument("--objective", choices=("circle", "cvnet"), default="circle")
    parser.add_argument("--arch", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128, help="P x K (the recipe's 32 x 4)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="a random start needs more than the recipe's 1e-4")
    parser.add_argument("--train-classes", type=int, default=32)
    parser.add_argument("--landmarks", type=int, default=48, help="synthetic training landmarks drawn")
    parser.add_argument("--views", type=int, default=8, help="views drawn per landmark")
    parser.add_argument("--queries", type=int, default=2, help="query views per held-out landmark")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    synth = SyntheticConfig(train_landmarks=args.landmarks, train_views_per_landmark=args.views)
    t0 = time.time()
    build_synthetic(args.root / "data", name="ft", config=synth, progress=False)
    folder = args.root / "folder"
    counts = write_class_folder(args.root / "data", "ft", folder, train_classes=args.train_classes,
                                queries=args.queries)
    print(f"class folder {folder}: {counts} ({time.time() - t0:.0f} s to draw and write)")
    overrides = _overrides(args, folder)
    print("recipe: configs/finetune_folder.yaml with", " ".join(overrides))
    cfg = load_config(CONFIG, overrides, schema=TRAIN_BACKBONE)
    start = build_global_model(cfg, env=DistEnv(), seed=int(cfg["run"]["seed"]))  # the run's own first weights
    t0 = time.time()
    before = retrieval_figures(start, folder / "test", args.image_size)
    print(f"before fine-tuning: {before} ({time.time() - t0:.0f} s to describe and score)")
    summary = train_backbone(cfg=cfg, overwrite=True, progress=False)
    print(f"fine-tuning: {summary['steps']} steps in {summary['seconds']:.0f} s, final {summary['final']}")
    after = retrieval_figures(load_timm_global(summary["checkpoint"]), folder / "test", args.image_size)
    print(f"after fine-tuning:  {after}")
    print(f"mAP {before['mAP']:.2f} -> {after['mAP']:.2f}, R@1 {before['R@1']:.2f} -> {after['R@1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
