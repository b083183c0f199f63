"""Tiny image sets and a stand-in model for the extraction and feature-cache tests: a revisitop layout of noise
images, a one-conv global model that counts the images it sees, and a dataset that records what was read."""
import pickle

import cv2
import numpy as np
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from models import OFFICIAL_CONVENTION

# (H, W) of the database images: two pairs of equal sizes, so batches of 2 happen, and odd ones out
DB_SIZES = [(64, 80), (80, 64), (64, 80), (72, 72), (80, 64), (64, 96), (72, 72)]


def write_layout(root, sizes=DB_SIZES, seed=0):
    """A revisitop layout named roxford5k: 7 noise images, 2 queries (cropped from images 0 and 3)."""
    rng = np.random.default_rng(seed)
    folder = root / "roxford5k" / "jpg"
    folder.mkdir(parents=True)
    imlist = [f"img{i}" for i in range(len(sizes))]
    for name, (h, w) in zip(imlist, sizes):
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 1.5)
        cv2.imwrite(str(folder / f"{name}.jpg"), img)
    gnd = [
        {"bbx": [3.7, 2.2, 60.9, 50.5], "easy": [2], "hard": [4], "junk": [5]},
        {"bbx": [0.0, 4.0, 70.0, 66.0], "easy": [6], "hard": [], "junk": []},
    ]
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["img0", "img3"], "gnd": gnd}, f, protocol=4)
    return root


class TinyNet(nn.Module):
    """A stand-in global model: conv, mean pool, L2 -> (B, 8); counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.depth = 0
        self.input_convention = OFFICIAL_CONVENTION
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return F.normalize(self.conv(x).mean(dim=(2, 3)), dim=-1)


class Recording(Dataset):
    """Delegates to a dataset and records which indices were read."""

    def __init__(self, base):
        self.base, self.read_indices = base, []
        self.image_paths, self.root, self.name = base.image_paths, base.root, base.name
        self.split, self.scales, self.convention = base.split, base.scales, base.convention

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.read_indices.append(i)
        return self.base[i]


class BatchSensitiveNet(TinyNet):
    """TinyNet whose descriptor of an image also depends on the other images of its batch (a hundredth of the
    batch's mean feature added), as a model's float result can: what the batch an image is extracted in
    changes shows in its descriptor."""

    def forward(self, x):
        self.seen += x.shape[0]
        feats = self.conv(x).mean(dim=(2, 3))
        return F.normalize(feats + 0.01 * feats.mean(dim=0, keepdim=True), dim=-1)
