"""Global-descriptor extraction throughput (images/s): CVNet (3 OpenCV scales) and SuperGlobal, 1024-side images.

Baseline: one image at a time, ``torch.no_grad``, the model as built (NCHW, BatchNorm as a separate pass).
Library paths (``helpers.extraction.extract_global_descriptors``): images bucketed by size (one aspect ratio per
bucket) and batched under ``torch.inference_mode``; ``fast=False`` runs the model as built, ``fast=True`` (the
default) an inference copy with BatchNorm folded into the convs, channels-last weights and inputs. ``--compile``
adds ``torch.compile``; on CUDA ``--dtype bfloat16``/``float16`` runs under autocast. The float32 fast path must
give the baseline's descriptors within 1e-5.

Images are random uint8 BGR arrays preprocessed before timing (the release's OpenCV resize per scale for CVNet,
scale 1.0 for SuperGlobal, which resizes inside the model): the figures are the models' throughput. A short side
below the retrieval pipeline's ``min_side`` (96) is enlarged as that pipeline does, so that ``--quick``'s small
images still leave SuperGlobal's Regional-GeM a 3x3 stage-4 map at scale 0.7071.
Run: ``python -m bench.extract`` (``--quick`` for a smoke test).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bench.common import (
    DTYPES,
    InMemory,
    add_common_args,
    check_equal,
    fast_dtype,
    format_table,
    interleaved,
    machine_info,
    median,
    print_header,
    ratio,
    setup_process,
)
from common.constants import CVNET_TEST_SCALES
from common.convention import OFFICIAL_CONVENTION
from datasets.transforms import min_size_guard, multiscale_tensors
from helpers.builders import build_model
from helpers.extraction import extract_global_descriptors
from helpers.retrieval.images import DEFAULT_MIN_SIDE
from models.functional import aggregate_scales

#: (H, W) of the images, cycled: revisited Oxford/Paris are mostly 1024x768 either way, some 3:2.
IMAGE_SIZES = ((768, 1024), (1024, 768), (768, 1024), (683, 1024))
#: What each model is built as, and the scales its data pipeline feeds it (SuperGlobal resizes inside the model).
MODELS = {"cvnet": ("cvnet_global", CVNET_TEST_SCALES), "superglobal": ("superglobal", (1.0,))}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--depth", type=int, default=50, choices=(50, 101))
    p.add_argument("--images", type=int, default=4, help="images per model")
    p.add_argument("--batch-size", type=int, default=2, help="images per batch of a size bucket (fast path)")
    p.add_argument("--models", default="cvnet,superglobal", help="which of cvnet, superglobal")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast model (slow first call)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="fast path dtype (CUDA autocast)")
    p.add_argument("--atol", type=float, default=1e-5)
    return p


def make_images(n: int, *, seed: int, scale: float = 1.0, min_side: int | None = DEFAULT_MIN_SIDE
                ) -> list[np.ndarray]:
    """``n`` random uint8 BGR images (H, W, 3), sizes cycled from :data:`IMAGE_SIZES` (times ``scale``), a short
    side below ``min_side`` enlarged by the retrieval pipeline's guard (a no-op at full size)."""
    rng = np.random.default_rng(seed)
    return [min_size_guard(rng.integers(0, 256, (int(h * scale), int(w * scale), 3), dtype=np.uint8), min_side)
            for h, w in (IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(n))]


@torch.no_grad()
def baseline_descriptors(model: nn.Module, items: Sequence[Sequence[Tensor]], device: torch.device) -> Tensor:
    """One image at a time, each scale through the model as built, the scales combined by the library's rule."""
    return torch.cat([aggregate_scales([model(x.unsqueeze(0).to(device)) for x in scales])
                      for scales in items]).float().cpu()


def library_descriptors(model: nn.Module, items: Sequence[Sequence[Tensor]], device: torch.device, *,
                        batch_size: int, fast: bool = True, compile_model: bool = False,
                        dtype: torch.dtype | None = None) -> Tensor:
    """``helpers.extraction.extract_global_descriptors`` over the preprocessed images."""
    return extract_global_descriptors(model=model, dataset=InMemory(items), device=device, batch_size=batch_size,
                                      progress=False, fast=fast, compile_model=compile_model, dtype=dtype)


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
    dtype = fast_dtype(args.dtype, device)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    scale = 0.125 if args.quick else 1.0
    n_images = min(args.images, 4) if args.quick else args.images
    repeats = args.repeats or (1 if args.quick else 2)
    images = make_images(n_images, seed=args.seed, scale=scale)
    print_header("Global descriptor extraction, images/s", machine_info(device), {
        "depth": args.depth, "images": f"{n_images} of sizes {sorted({im.shape[:2] for im in images})}",
        "batch_size": args.batch_size, "compile": args.compile, "dtype": args.dtype, "repeats": repeats})
    rows, ok = [], True
    for name in names:
        kind, scales = MODELS[name]
        # seed=None: random weights from the global RNG that setup_process seeded, the models of earlier runs
        model = build_model(kind, depth=args.depth, seed=None, warn_random=False)
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
