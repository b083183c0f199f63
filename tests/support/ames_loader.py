"""AMES's / LoCoRe's reading of an exported shortlist, restated for the export tests
(tests/helpers/evaluation/test_export.py, tests/scripts/test_eval.py): the files must load the way their loaders
load them."""
from __future__ import annotations

import pickle

import numpy as np
import torch


def read_ames_shortlist(folder, gnd, desc_name: str = "superglobal"):
    """As AMES's test loader and re-ranking read ``nn_<desc_name>.pkl``: plain pickle.load, then per query the
    ground truth's junk moved to the end, similarities [0] and indices [1].long(). Returns (the loaded tensor,
    similarities, indices)."""
    with open(folder / f"nn_{desc_name}.pkl", "rb") as f:
        cache_nn = pickle.load(f)
    nn = cache_nn.clone()
    for i in range(cache_nn.shape[1]):
        is_junk = np.isin(cache_nn[1, i].numpy(), gnd[i]["junk"])
        nn[:, i] = torch.cat((cache_nn[:, i, ~is_junk], cache_nn[:, i, is_junk]), dim=1)
    return cache_nn, nn[0], nn[1].long()
