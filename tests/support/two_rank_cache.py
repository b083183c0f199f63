"""One rank of a two-rank (gloo) feature-cache run, started by tests/helpers/test_feature_cache.py through
tests.support.launch.run_two_cpu_ranks: ``python two_rank_cache.py LAYOUT_ROOT CACHE_DIR OUT_DIR``.

Each rank hashes the database's files with a memo of its own (how many files it read), extracts the set through
the feature cache twice (a miss, then a hit) with a model sensitive to its batches, and writes what it saw to
``OUT_DIR/rank<r>.json``; rank 0 also saves the descriptors it returned (``OUT_DIR/descriptors.pt``)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from datasets.revisited import RevisitedDataset  # noqa: E402
from helpers.cache_keys import ContentHashes, feature_cache_key  # noqa: E402
from helpers.distributed import cleanup_distributed, init_distributed  # noqa: E402
from helpers.feature_cache import cached_global_descriptors  # noqa: E402
from tests.support.tiny_sets import BatchSensitiveNet, Recording  # noqa: E402

BATCH_SIZE = 3


def main(root: str, cache_dir: str, out_dir: str) -> None:
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BatchSensitiveNet().eval()
    ds = Recording(RevisitedDataset(root, "roxford5k", "db", scales=(1.0,)))
    hashes = ContentHashes(Path(out_dir) / f"memo-{env.rank}", env=env)
    key = feature_cache_key(model=model, dataset=ds, hashes=hashes)
    kw = {"model": model, "dataset": ds, "cache_dir": cache_dir, "label": "db", "batch_size": BATCH_SIZE,
          "rank": env.rank, "world_size": env.world_size, "progress": False}
    first = cached_global_descriptors(**kw)
    read_first = sorted(ds.read_indices)
    second = cached_global_descriptors(**kw)
    seen = {"key": key, "hashed": hashes.hashed, "read": read_first, "first_is_none": first is None,
            "read_again": sorted(ds.read_indices[len(read_first):]), "second_is_none": second is None}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(seen))
    if env.is_main:
        torch.save({"first": first, "second": second}, Path(out_dir) / "descriptors.pt")
    cleanup_distributed(env)


if __name__ == "__main__":
    main(*sys.argv[1:4])
