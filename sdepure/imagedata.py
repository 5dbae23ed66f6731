"""CIFAR-10 and ImageNet from local files, as float [0, 1] tensors, without torchvision.

CIFAR-10 is read from the "python version" distributed by its authors: a directory
cifar-10-batches-py/ holding data_batch_1..5, test_batch and batches.meta, each a pickled dict
whose 'data' is a uint8 array (N, 3072) (each row the 1024 red, then green, then blue values of a
32x32 image in row-major order) and whose 'labels' is a list of N ints in 0..9. The files were
written by Python 2, so their keys come back as str under encoding='latin1' (what torchvision
uses, and what numpy needs to rebuild Python 2 arrays); files rewritten by Python 3 have bytes
keys (b'data'). Both are accepted.

Unpickling can run arbitrary code, so these files go through a restricted unpickler: a pickle may
name only the few functions that rebuild numpy arrays (numpy's _reconstruct / _frombuffer /
scalar, the ndarray and dtype classes) and _codecs.encode (Python 3 writes bytes through it
under protocol 2). None of them runs anything beyond building an array or a bytes object; any
other global (os.system, builtins.eval, a user class, ...) stops loading before it is called.

ImageNet validation is read from a class-folder tree root/<wnid>/*.JPEG, ordered as torchvision's
ImageFolder orders it: class folders sorted by name give labels 0..K-1; within a class, files
sorted by path (subfolders walked), extensions matched case-insensitively. The official
validation images come in one flat folder; they must first be sorted into <wnid> folders (the
usual valprep.sh) so that sorted wnids give the standard label indices.

Preprocessing as the papers' torchvision pipelines do it on PIL images (checked in each repo):
  * DensePure (Jayfeather1024/DensePure, datasets.py _imagenet 'test'): Resize(256, BICUBIC),
    CenterCrop(256), ToTensor: 256x256 straight into the 256x256 guided-diffusion model.
  * DiffPure (NVlabs/DiffPure, data/datasets.py 'imval'): Resize(256) (bilinear), CenterCrop(224),
    ToTensor; eval_sde_adv.py then upsamples 224 -> 256 (F.interpolate bilinear) for diffusion.
  * Carlini et al. (ethz-spylab/diffusion_denoised_smoothing, imagenet/certify.py) and Cohen et al.
    (locuslab/smoothing, code/datasets.py): Resize(256) (bilinear), CenterCrop(224), ToTensor;
    Carlini's code passes the 224x224 image to the 256x256 diffusion model unresized.
CIFAR-10 in all of them: ToTensor only. Resize(s) scales the shorter side to s and the longer to
int(s * long / short); CenterCrop's offsets are int(round((size - crop) / 2)).

Test subsets: DensePure certifies CIFAR-10 test indices 0, 20, ..., 9980 (500 images) and ImageNet
validation indices 0, 500, ..., 49500 (100 images) (run_scripts/densepure_*.sh, --sample_id);
Carlini's certify.py keeps i % skip == 0 (README: --skip 1 on CIFAR-10, --skip 50 on ImageNet);
DiffPure draws num_sub indices with np.random.RandomState(data_seed).choice(N, num_sub,
replace=False) (run scripts: 64 per seed on CIFAR-10, 16 on ImageNet).
"""
from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import SdepureError, first_line

# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_TEST_SIZE = 10_000
CIFAR10_TEST_SKIP = 20  # DensePure: 500 of the 10,000 test images


def _numpy_globals() -> dict:
    """(module, name) -> object for what rebuilding a numpy array needs, under both numpy 1's
    module names (numpy.core, used by the original files) and numpy 2's (numpy._core)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): codecs.encode}
    for pkg in ("numpy.core", "numpy._core"):
        table[(pkg + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(pkg + ".multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol-5 arrays
            table[(pkg + ".numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _Refused(pickle.UnpicklingError):
    """A global or persistent id outside the allow-list (as opposed to a damaged stream)."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; everything else is refused before it is imported."""

    _allowed = None

    def find_class(self, module, name):
        if _ArrayOnlyUnpickler._allowed is None:
            _ArrayOnlyUnpickler._allowed = _numpy_globals()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _Refused(f"it references {module}.{name}, which plain arrays never need")
        return obj

    def persistent_load(self, pid):
        raise _Refused("it uses persistent ids, which plain arrays never need")


def read_restricted_pickle(path: Path):
    """Unpickle a file that should hold only containers, numbers, strings and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise SdepureError(f"refused to unpickle {path}: {e}") from None
    except OSError as e:
        raise SdepureError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated stream (EOFError), garbage opcodes, bad array state, ...
        raise SdepureError(f"{path} is corrupt or not a pickle ({type(e).__name__}: {first_line(e)})") from None



def _get(d: dict, key: str):
    """Python 2 files give str keys under latin1, Python 3 rewrites give bytes keys."""
    if key in d:
        return d[key]
    return d.get(key.encode("ascii"))


def cifar10_dir(root) -> Path:
    """root itself if it holds the batches, else root/cifar-10-batches-py."""
    root = Path(os.path.expanduser(str(root)))
    for d in (root, root / CIFAR10_DIRNAME):
        if (d / CIFAR10_TEST_FILE).is_file() or (d / CIFAR10_TRAIN_FILES[0]).is_file():
            return d
    if not root.exists():
        raise SdepureError(f"CIFAR-10 directory not found: {root}")
    raise SdepureError(f"no CIFAR-10 python batches in {root} (expected {root / CIFAR10_DIRNAME}/"
                       f"{CIFAR10_TEST_FILE} and data_batch_1..5)")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise SdepureError(f"CIFAR-10 batch missing: {path}")
    d = read_restricted_pickle(path)
    if not isinstance(d, dict):
        raise SdepureError(f"{path} is not a CIFAR-10 batch (holds a {type(d).__name__}, not a dict)")
    data, labels = _get(d, "data"), _get(d, "labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise SdepureError(f"{path} is not a CIFAR-10 batch (needs 'data' as a numpy array and 'labels')")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SdepureError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise SdepureError(f"{path}: 'labels' are not integers") from None
    if labels.shape != (data.shape[0],):
        raise SdepureError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise SdepureError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data, labels


def load_cifar10(root, split: str = "test", indices: Sequence[int] | torch.Tensor | None = None):
    """(images (N, 3, 32, 32) float32 in [0, 1], labels (N,) int64) of CIFAR-10's 'test' or 'train'
    split (train = data_batch_1..5 in order), optionally only at `indices` (in that order)."""
    if split not in ("train", "test"):
        raise SdepureError(f"unknown CIFAR-10 split {split!r}; choose train or test")
    d = cifar10_dir(root)
    files = CIFAR10_TRAIN_FILES if split == "train" else (CIFAR10_TEST_FILE,)
    parts = [_read_cifar_batch(d / f) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if indices is not None:
        idx = _check_indices(indices, len(labels), f"CIFAR-10 {split}")
        data, labels = data[idx], labels[idx]
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels)


def cifar10_classes(root) -> list[str]:
    """The ten class names from batches.meta ('label_names')."""
    path = cifar10_dir(root) / CIFAR10_META_FILE
    if not path.is_file():
        raise SdepureError(f"CIFAR-10 metadata missing: {path}")
    meta = read_restricted_pickle(path)
    names = _get(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names:
        raise SdepureError(f"{path} has no 'label_names' list")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


# ----------------------------------------------------------------------------------------------
# ImageNet (class-folder tree)
# ----------------------------------------------------------------------------------------------

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_VAL_SIZE = 50_000
IMAGENET_VAL_SKIP = 500  # DensePure: 100 of the 50,000 validation images

# Keyword arguments of ImageFolder / load_imagenet_val reproducing each paper's pipeline.
IMAGENET_PREPROCESSING = {
    "densepure": dict(resize=256, crop=256, interpolation="bicubic"),
    "diffpure": dict(resize=256, crop=224, interpolation="bilinear"),
    "carlini": dict(resize=256, crop=224, interpolation="bilinear"),
    "cohen": dict(resize=256, crop=224, interpolation="bilinear"),
}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise SdepureError("reading image files needs Pillow: pip install pillow") from None
    return Image


def image_folder_samples(root) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(path, label), ...], classes) in torchvision ImageFolder order."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise SdepureError(f"image directory not found: {root}")
    with os.scandir(root) as it:
        entries = list(it)
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)
        hint = (" (it holds loose images: sort them into one folder per class, e.g. with valprep.sh)"
                if loose else "")
        raise SdepureError(f"{root} has no class folders; expected {root}/<class>/<image>{hint}")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            found += [Path(dirpath) / f for f in sorted(fnames) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(name)
        samples += [(p, label) for p in found]
    if empty:
        raise SdepureError(f"{root}: no images in class folder(s) {', '.join(empty[:5])}"
                           + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else ""))
    return samples, classes


def preprocess_image(img, resize: int = 256, crop: int = 256, interpolation: str = "bicubic") -> torch.Tensor:
    """PIL image -> (3, crop, crop) float32 in [0, 1]: RGB, shorter side to `resize`, centre crop,
    exactly as torchvision's Resize(resize, interpolation) + CenterCrop(crop) + ToTensor on PIL."""
    Image = _pil()
    resampling = getattr(Image, "Resampling", Image)
    modes = {"bilinear": resampling.BILINEAR, "bicubic": resampling.BICUBIC}
    if interpolation not in modes:
        raise SdepureError(f"unknown interpolation {interpolation!r}; choose bilinear or bicubic")
    if crop > resize:
        raise SdepureError(f"crop {crop} is larger than the resized shorter side {resize}")
    img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)  # torchvision truncates
    new_w, new_h = (resize, new_long) if w <= h else (new_long, resize)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), modes[interpolation])
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)


class ImageFolder:
    """A class-folder image set read lazily: ds[i] -> (image (3, crop, crop) in [0, 1], label).
    Defaults are DensePure's ImageNet preprocessing (256 bicubic, centre crop 256)."""

    def __init__(self, root, resize: int = 256, crop: int = 256, interpolation: str = "bicubic"):
        self.root = Path(os.path.expanduser(str(root)))
        self.samples, self.classes = image_folder_samples(self.root)
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        Image = _pil()
        try:
            with Image.open(path) as img:
                x = preprocess_image(img, self.resize, self.crop, self.interpolation)
        except SdepureError:
            raise
        except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
            raise SdepureError(f"cannot read image {path}: {first_line(e)}") from None
        return x, label

    def load(self, indices: Sequence[int] | torch.Tensor | None = None):
        """(images (N, 3, crop, crop), labels (N,)) at `indices` (all images if None)."""
        idx = range(len(self)) if indices is None else _check_indices(indices, len(self), str(self.root)).tolist()
        items = [self[i] for i in idx]
        if not items:
            return torch.empty(0, 3, self.crop, self.crop), torch.empty(0, dtype=torch.long)
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def load_imagenet_val(root, indices: Sequence[int] | torch.Tensor | None = None, resize: int = 256,
                      crop: int = 256, interpolation: str = "bicubic"):
    """ImageNet validation images (from a class-folder tree) at `indices` as (x, y); e.g.
    load_imagenet_val(root, imagenet_val_subset()) for DensePure's 100 images, or pass
    **IMAGENET_PREPROCESSING['carlini'] for a 224 crop. All 50,000 at 256x256 would need ~39 GB."""
    return ImageFolder(root, resize, crop, interpolation).load(indices)


# ----------------------------------------------------------------------------------------------
# The papers' test subsets
# ----------------------------------------------------------------------------------------------

def _check_indices(indices, n: int, what: str) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise SdepureError(f"{what}: indices must be a 1-D list of integers")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise SdepureError(f"{what}: index {idx.max() if idx.max() >= n else idx.min()} out of range (0..{n - 1})")
    return idx


def every_kth(n_total: int, k: int, start: int = 0) -> torch.Tensor:
    """start, start + k, ... below n_total (Cohen et al.'s --skip, DensePure's --sample_id)."""
    if k < 1 or start < 0:
        raise SdepureError(f"need k >= 1 and start >= 0, got k={k}, start={start}")
    return torch.arange(start, n_total, k, dtype=torch.long)


def cifar10_test_subset(n_total: int = CIFAR10_TEST_SIZE) -> torch.Tensor:
    """Every 20th CIFAR-10 test image: 0, 20, ..., 9980 (500 images)."""
    return every_kth(n_total, CIFAR10_TEST_SKIP)


def imagenet_val_subset(n_total: int = IMAGENET_VAL_SIZE) -> torch.Tensor:
    """Every 500th ImageNet validation image in ImageFolder order: 0, 500, ..., 49500 (100 images;
    with 50 images per class, the first image of every 10th class)."""
    return every_kth(n_total, IMAGENET_VAL_SKIP)


def diffpure_subset(n_total: int, num_sub: int, data_seed: int) -> torch.Tensor:
    """DiffPure's random evaluation subset: np.random.RandomState(data_seed).choice(n_total,
    num_sub, replace=False), in that (unsorted) order. RandomState's stream is frozen by numpy."""
    if not 0 < num_sub <= n_total:
        raise SdepureError(f"num_sub must be in 1..{n_total}, got {num_sub}")
    return torch.from_numpy(np.random.RandomState(data_seed).choice(n_total, num_sub, replace=False).astype(np.int64))


__all__ = ["load_cifar10", "cifar10_classes", "cifar10_dir", "read_restricted_pickle",
           "ImageFolder", "image_folder_samples", "preprocess_image", "load_imagenet_val",
           "IMAGENET_PREPROCESSING", "every_kth", "cifar10_test_subset", "imagenet_val_subset",
           "diffpure_subset"]
