"""RNG capture / restore and the training checkpoint file."""
import random

import numpy as np
import pytest
import torch

from helpers.training.state import capture_rng_state, load_train_state, restore_rng_state, save_train_state


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    save_train_state(tmp_path / "s.pth", {"step": 1, "rng": [state]})
    loaded = load_train_state(tmp_path / "s.pth")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(loaded["rng"][0])
    got = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_train_state_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        load_train_state(tmp_path / "absent.pth")
    torch.save({"step": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_train_state(tmp_path / "other.pth")
