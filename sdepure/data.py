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


DATASETS = {
    "digits": "scikit-learn's 8x8 digits (embedded; split = test | train)",
    "cifar10": "CIFAR-10 python version from a local directory (root = the folder holding "
               "cifar-10-batches-py/; split = test | train)",
    "imagenet": "ImageNet validation as a local class-folder tree (root/<wnid>/*.JPEG); "
                "preprocessing = densepure | diffpure | carlini | cohen",
}


class LazyImages:
    """Images read one at a time from an ImageFolder: images[i] -> (C, H, W) in [0, 1]."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.folder[int(i)][0]


def _root(cfg: dict, what: str) -> str:
    root = cfg.get("root")
    if not root:
        raise SdepureError(f"dataset {what} needs a directory: data.root in the config or --data-root")
    from .loaders import expand_path

    return str(expand_path(str(root), "data.root"))


def load_dataset(cfg: dict):
    """(images, labels, num_classes) from a config's [data] table. `images` supports len() and
    images[i] -> (C, H, W) in [0, 1] (a tensor, or lazily read files for ImageNet)."""
    name = cfg.get("dataset")
    if name == "digits":
        x, y = load_digits(cfg.get("split", "test"))
        return x, y, 10
    if name == "cifar10":
        from .imagedata import load_cifar10

        x, y = load_cifar10(_root(cfg, name), cfg.get("split", "test"))
        return x, y, 10
    if name == "imagenet":
        from .imagedata import IMAGENET_PREPROCESSING, ImageFolder

        preset = cfg.get("preprocessing", "densepure")
        if preset not in IMAGENET_PREPROCESSING:
            raise SdepureError(f"unknown ImageNet preprocessing {preset!r}; known: {', '.join(IMAGENET_PREPROCESSING)}")
        folder = ImageFolder(_root(cfg, name), **IMAGENET_PREPROCESSING[preset])
        labels = torch.tensor([label for _, label in folder.samples], dtype=torch.long)
        return LazyImages(folder), labels, int(cfg.get("num_classes", 1000))
    raise SdepureError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def take(images, indices) -> torch.Tensor:
    """Stack images[i] for i in indices (works for tensors and LazyImages)."""
    if torch.is_tensor(images):
        return images[list(indices)]
    return torch.stack([images[i] for i in indices])
