"""Global-descriptor extraction throughput (images/s): CVNet (3 OpenCV scales) and SuperGlobal, 1024-side images.

Baseline: one image at a time, ``torch.no_grad``, the model as built (NCHW, BatchNorm as a separate pass).
Library paths (``helpers.extraction.extract_global_descriptors``): images bucketed by size (one aspect ratio per
bucket) and batched under ``torch.inference_mode``; ``fast=False`` runs the model as built, ``fast=True`` (the
default) an inference copy with BatchNorm folded into the convs, channels-last weights and inputs. ``--compile``
adds ``torch.compile``; on CUDA ``--dtype bfloat16``/``float16`` runs under autocast. The float32 fast path must
give the baseline's descriptors within 1e-5.

Images are random uint8 BGR arrays preprocessed before timing (the release's OpenCV resize per scale for CVNet,
scale 1.0 for SuperGlobal, which resizes inside the model): the figures are the models' throughput.
Run: ``python -m bench.extract`` (``--quick`` for a smoke test).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from bench.common import (
    add_common_args,
    check_equal,
    format_table,
    interleaved,
    machine_info,
    median,
    print_header,
    ratio,
    setup_process,
)
from datasets.transforms import multiscale_tensors
from helpers.extraction import extract_global_descriptors
from models.checkpoint import OFFICIAL_CONVENTION
from models.cvnet import CVNetGlobal
from models.superglobal import SuperGlobal

#: CVNet's multi-scale test (the uint8 image resized with OpenCV per scale).
CVNET_SCALES = (0.7071, 1.0, 1.4142)
#: (H, W) of the images, cycled: revisited Oxford/Paris are mostly 1024x768 either way, some 3:2.
IMAGE_SIZES = ((768, 1024), (1024, 768), (768, 1024), (683, 1024))
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--depth", type=int, default=50, choices=(50, 101))
    p.add_argument("--images", type=int, default=4, help="images per model")
    p.add_argument("--batch-size", type=int, default=2, help="images per batch of a size bucket (fast path)")
    p.add_argument("--models", default="cvnet,superglobal", help="which of cvnet, superglobal")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast model (slow first call)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="fast path dtype (CUDA autocast)")
    p.add_argument("--atol", type=float, default=1e-5)
    return p


def make_images(n: int, *, seed: int, scale: float = 1.0) -> list[np.ndarray]:
    """``n`` random uint8 BGR images (H, W, 3), sizes cycled from :data:`IMAGE_SIZES` (times ``scale``)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(h * scale), int(w * scale), 3), dtype=np.uint8)
            for h, w in (IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(n))]


def aggregate(per_scale: Sequence[Tensor]) -> Tensor:
    """CVNet's multi-scale descriptor: L2 each scale's (B, D), mean, L2 (a single scale passes through)."""
    if len(per_scale) == 1:
        return per_scale[0]
    return F.normalize(torch.stack([F.normalize(d, dim=-1) for d in per_scale]).mean(0), dim=-1)


@torch.no_grad()
def baseline_descriptors(model: nn.Module, items: Sequence[Sequence[Tensor]], device: torch.device) -> Tensor:
    """One image at a time, each scale through the model as built."""
    return torch.cat([aggregate([model(x.unsqueeze(0).to(device)) for x in scales]) for scales in items]).float().cpu()


class InMemory(Dataset):
    """Preprocessed images, item i = list of per-scale (3, H_s, W_s) tensors (what the revisited datasets yield)."""

    def __init__(self, items: Sequence[Sequence[Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[Tensor]:
        return list(self.items[i])


def library_descriptors(model: nn.Module, items: Sequence[Sequence[Tensor]], device: torch.device, *,
                        batch_size: int, fast: bool = True, compile_model: bool = False,
                        dtype: torch.dtype | None = None) -> Tensor:
    """``helpers.extraction.extract_global_descriptors`` over the preprocessed images."""
    return extract_global_descriptors(model=model, dataset=InMemory(items), device=device, batch_size=batch_size,
                                      progress=False, fast=fast, compile_model=compile_model, dtype=dtype)


def build_model(name: str, depth: int) -> tuple[nn.Module, tuple[float, ...]]:
    """(model with random weights, the scales the data pipeline feeds it)."""
    if name == "cvnet":
        return CVNetGlobal(depth), CVNET_SCALES
    if name == "superglobal":
        return SuperGlobal(depth), (1.0,)
    raise SystemExit(f"unknown model {name!r}: expected cvnet or superglobal")


def randomise_batchnorm_(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so that folding them into the convs is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = setup_process(args)
    dtype = _DTYPES[args.dtype]
    if dtype != torch.float32 and device.type != "cuda":
        raise SystemExit(f"--dtype {args.dtype} is a CUDA option (autocast); on the CPU use float32")
    scale = 0.125 if args.quick else 1.0
    n_images = min(args.images, 4) if args.quick else args.images
    repeats = args.repeats or (1 if args.quick else 2)
    images = make_images(n_images, seed=args.seed, scale=scale)
    print_header("Global descriptor extraction, images/s", machine_info(device), {
        "depth": args.depth, "images": f"{n_images} of sizes {sorted({im.shape[:2] for im in images})}",
        "batch_size": args.batch_size, "compile": args.compile, "dtype": args.dtype, "repeats": repeats})
    rows, ok = [], True
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, scales = build_model(name, args.depth)
        randomise_batchnorm_(model, args.seed)
        model = model.to(device).eval()
        items = [multiscale_tensors(im, scales, OFFICIAL_CONVENTION) for im in images]
        kw = {"batch_size": args.batch_size, "compile_model": args.compile, "dtype": dtype}
        times = interleaved({
            "baseline": lambda m=model, it=items: baseline_descriptors(m, it, device),
            "batched": lambda m=model, it=items, kw=kw: library_descriptors(m, it, device, fast=False, **kw),
            "fast": lambda m=model, it=items, kw=kw: library_descriptors(m, it, device, fast=True, **kw),
        }, repeats=repeats, warmup=1, device=device)
        base, batched, fast = (median(times[k]) for k in ("baseline", "batched", "fast"))
        label = f"{name} ({len(scales)} scale{'s' if len(scales) > 1 else ''}"
        label += ", resized inside the model)" if name == "superglobal" else ")"
        rows.append([label, n_images / base, n_images / batched, n_images / fast, ratio(base, fast)])
        if dtype == torch.float32:
            ok &= check_equal(name, library_descriptors(model, items, device, batch_size=args.batch_size),
                              baseline_descriptors(model, items, device), args.atol)
    print(format_table(["model", "baseline images/s", "batched images/s", "fast images/s", "speed-up (fast)"], rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
