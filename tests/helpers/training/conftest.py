"""Fixtures of the training-library tests."""
import numpy as np
import pytest
from torch.utils.data import Dataset


class ConstantImages(Dataset):
    """Item i: a constant image of value 10 * i (so its source is readable), label = i // 3."""

    def __init__(self, n=12):
        self.targets = [i // 3 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return np.full((20, 30, 3), 10 * i, dtype=np.uint8), self.targets[i]


@pytest.fixture
def constant_images():
    """The :class:`ConstantImages` class: call it with the number of items (12 by default)."""
    return ConstantImages
