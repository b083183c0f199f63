"""A 20-item least-squares dataset for the training-loop tests (seeded: every instance holds the same items)."""
import torch
from torch.utils.data import Dataset


class ToyRegression(Dataset):
    """Item i: (x_i (3,), y_i ()) with y = x . (1, -2, 0.5) + small noise."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(20, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(20, generator=g)

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return self.x[i], self.y[i]
