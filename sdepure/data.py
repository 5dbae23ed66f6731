"""Datasets as (images in [0, 1], labels) tensors. The embedded default: scikit-learn's 8x8 digits."""
from __future__ import annotations

import numpy as np
import torch

from .errors import SdepureError

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def load_digits(split: str = "test"):
    """The 1,797 8x8 digits shipped inside scikit-learn, as (N, 1, 8, 8) floats in [0, 1].

    A fixed permutation (seed 0) puts 20% (359 images) in `test`, the rest (1,438) in `train`."""
    if split not in ("train", "test", "all"):
        raise SdepureError(f"unknown digits split {split!r}; choose train, test or all")
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    idx = torch.from_numpy(np.sort(idx))
    return x[idx], y[idx]


DATASETS = ("digits",)


def load_dataset(cfg: dict):
    """(images, labels, num_classes) from a config's [data] table."""
    name = cfg.get("dataset")
    if name == "digits":
        x, y = load_digits(cfg.get("split", "test"))
        return x, y, 10
    raise SdepureError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
