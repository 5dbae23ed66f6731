import os
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch

from sdepure.errors import SdepureError
from sdepure.imagedata import (IMAGENET_PREPROCESSING, ImageFolder, cifar10_classes, cifar10_test_subset,
                               diffpure_subset, every_kth, image_folder_samples, imagenet_val_subset,
                               load_cifar10, load_imagenet_val, preprocess_image)

Image = pytest.importorskip("PIL.Image")

# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------


def _py2_pickle(d: dict) -> bytes:
    """Protocol-2 bytes as Python 2's cPickle + numpy 1.x wrote the original batches: str keys and
    values as (SHORT_)BINSTRING, arrays via numpy.core.multiarray._reconstruct + BUILD."""
    def s(b):
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(n):
        return (b"K" + bytes([n])) if 0 <= n < 256 else (b"J" + struct.pack("<i", n))

    def v(x):
        if isinstance(x, bytes):
            return s(x)
        if isinstance(x, int):
            return i(x)
        if isinstance(x, list):
            return b"](" + b"".join(v(e) for e in x) + b"e"
        dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
                 + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b")
                + b"\x87R" + b"(" + i(1) + i(x.shape[0]) + i(x.shape[1]) + b"\x86" + dtype + b"\x89"
                + s(x.tobytes()) + b"tb")

    return b"\x80\x02}(" + b"".join(s(k) + v(x) for k, x in d.items()) + b"u."


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(c) for c in rng.integers(0, 10, size=n)]
    return data, labels


NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar(root, style="py3", protocol=2, n_test=45, n_train=4):
    """A tiny cifar-10-batches-py directory in the published layout; returns the arrays written."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written = {}
    for k, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data, labels = _batch(n_test if name == "test_batch" else n_train, seed=k)
        written[name] = (data, labels)
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{j}.png".encode() for j in range(len(labels))]}
        blob = _py2_pickle(entry) if style == "py2" else pickle.dumps(entry, protocol=protocol)
        (d / name).write_bytes(blob)
    meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(_py2_pickle(meta) if style == "py2" else pickle.dumps(meta, protocol=protocol))
    return d, written


@pytest.mark.parametrize("style,protocol", [("py2", 2), ("py3", 2), ("py3", 4), ("py3", 5)])
def test_cifar10_round_trip(tmp_path, style, protocol):
    d, written = _write_cifar(tmp_path, style, protocol)
    data, labels = written["test_batch"]
    for root in (tmp_path, d):  # the parent or the batches directory itself
        x, y = load_cifar10(root, "test")
        assert x.shape == (45, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y, torch.tensor(labels))
        # row-major CHW: row j, bytes 0..1023 red, 1024..2047 green, 2048..3071 blue
        j = 7
        assert torch.equal((x[j, 1, 2, 5] * 255).round().to(torch.uint8), torch.tensor(data[j, 1024 + 2 * 32 + 5]))
        assert torch.equal((x * 255).round().to(torch.uint8).reshape(45, -1), torch.from_numpy(data))
    xt, yt = load_cifar10(tmp_path, "train")
    assert xt.shape == (20, 3, 32, 32)
    assert yt.tolist() == sum((written[f"data_batch_{j}"][1] for j in range(1, 6)), [])
    assert cifar10_classes(tmp_path) == NAMES


def test_cifar10_every_20th_subset(tmp_path):
    _write_cifar(tmp_path)
    sub = cifar10_test_subset(n_total=45)
    assert sub.tolist() == [0, 20, 40]
    x_all, y_all = load_cifar10(tmp_path, "test")
    x, y = load_cifar10(tmp_path, "test", indices=sub)
    assert torch.equal(x, x_all[sub]) and torch.equal(y, y_all[sub])
    full = cifar10_test_subset()
    assert len(full) == 500 and full[0] == 0 and full[-1] == 9980 and torch.all(full.diff() == 20)
    with pytest.raises(SdepureError, match="out of range"):
        load_cifar10(tmp_path, "test", indices=[0, 45])


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_RunsShell, _WritesFile])
def test_cifar10_refuses_code_carrying_pickle(tmp_path, payload):
    d, _ = _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    data, labels = _batch(3, seed=0)
    # the payload hides inside an otherwise valid-looking batch
    blob = pickle.dumps({b"data": data, b"labels": labels, b"extra": payload(marker)}, protocol=2)
    names = {(a or "").split(" ")[-1] for op, a, _ in pickletools.genops(blob) if op.name == "GLOBAL"}
    assert names & {"system", "exec"}  # the stream really does carry a call
    (d / "test_batch").write_bytes(blob)
    refused = r"refused to unpickle .*test_batch: it references (posix\.system|__builtin__\.exec)"
    with pytest.raises(SdepureError, match=refused):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_cifar10_bad_directories(tmp_path):
    with pytest.raises(SdepureError, match="CIFAR-10 directory not found"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdepureError, match="no CIFAR-10 python batches"):
        load_cifar10(tmp_path / "empty")
    d, _ = _write_cifar(tmp_path / "c")
    blob = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SdepureError, match="corrupt or not a pickle"):
        load_cifar10(tmp_path / "c", "test")
    (d / "data_batch_3").unlink()
    with pytest.raises(SdepureError, match="batch missing: .*data_batch_3"):
        load_cifar10(tmp_path / "c", "train")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    with pytest.raises(SdepureError, match="uint8 of shape"):
        load_cifar10(tmp_path / "c", "test")
    (d / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SdepureError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path / "c", "test")
    with pytest.raises(SdepureError, match="unknown CIFAR-10 split"):
        load_cifar10(tmp_path / "c", "val")


# ----------------------------------------------------------------------------------------------
# ImageNet class folders
# ----------------------------------------------------------------------------------------------


def _save(path, w, h, seed, fmt):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt)
    return arr


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "val"
    # unsorted creation; 'Zebra' < 'n01...' in Python's (code point) order, as in ImageFolder
    _save(root / "n02" / "b.JPEG", 300, 280, 0, "JPEG")
    _save(root / "n02" / "a.png", 256, 300, 1, "PNG")
    _save(root / "n01" / "x.JPEG", 200, 400, 2, "JPEG")
    _save(root / "Zebra" / "sub" / "deep.jpg", 64, 48, 3, "JPEG")
    _save(root / "n01" / "w.PNG", 512, 256, 4, "PNG")
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_imagenet_class_order_shapes_range(tree):
    samples, classes = image_folder_samples(tree)
    assert classes == ["Zebra", "n01", "n02"]
    assert [(p.relative_to(tree).as_posix(), y) for p, y in samples] == [
        ("Zebra/sub/deep.jpg", 0), ("n01/w.PNG", 1), ("n01/x.JPEG", 1), ("n02/a.png", 2), ("n02/b.JPEG", 2)]
    x, y = load_imagenet_val(tree)
    assert x.shape == (5, 3, 256, 256) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.1
    assert y.tolist() == [0, 1, 1, 2, 2]
    x2, y2 = load_imagenet_val(tree, indices=[3, 0])
    assert torch.equal(x2, x[[3, 0]]) and y2.tolist() == [2, 0]
    ds = ImageFolder(tree, **IMAGENET_PREPROCESSING["carlini"])
    img, label = ds[4]
    assert img.shape == (3, 224, 224) and label == 2


def test_imagenet_preprocessing_matches_torchvision_rules(tree):
    # 256 x 300 (w x h): shorter side already 256, so only the centre crop: top = round(44 / 2) = 22
    with Image.open(tree / "n02" / "a.png") as img:
        arr = np.asarray(img)
        x = preprocess_image(img, 256, 256, "bicubic")
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(arr[22:278].transpose(2, 0, 1).copy()))
    # 512 x 256 -> unchanged height, crop left = 128; 224 crop of 256 x 512 -> top 16, left 144
    with Image.open(tree / "n01" / "w.PNG") as img:
        arr = np.asarray(img)
        x = preprocess_image(img, 256, 224, "bilinear")
    expected = torch.from_numpy(arr[16:240, 144:368].transpose(2, 0, 1).copy())
    assert torch.equal((x * 255).round().to(torch.uint8), expected)
    # 300 x 280 -> (int(256 * 300 / 280), 256) = (274, 256), then crop left = round(18 / 2) = 9
    with Image.open(tree / "n02" / "b.JPEG") as f:
        img = f.copy()
    ref = np.asarray(img.convert("RGB").resize((274, 256), Image.Resampling.BICUBIC).crop((9, 0, 265, 256)))
    x = preprocess_image(img, 256, 256, "bicubic")
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(ref.transpose(2, 0, 1).copy()))
    with pytest.raises(SdepureError, match="larger than"):
        preprocess_image(img, 224, 256)
    with pytest.raises(SdepureError, match="interpolation"):
        preprocess_image(img, 256, 256, "lanczos")


def test_imagenet_errors(tmp_path, tree):
    with pytest.raises(SdepureError, match="image directory not found"):
        ImageFolder(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    _save(flat / "ILSVRC2012_val_00000001.JPEG", 32, 32, 0, "JPEG")
    with pytest.raises(SdepureError, match="no class folders.*valprep"):
        ImageFolder(flat)
    (tree / "n03").mkdir()
    with pytest.raises(SdepureError, match="no images in class folder.*n03"):
        ImageFolder(tree)
    (tree / "n03" / "bad.JPEG").write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = ImageFolder(tree)
    with pytest.raises(SdepureError, match="cannot read image .*bad.JPEG"):
        ds.load([5])
    with pytest.raises(SdepureError, match="out of range"):
        ds.load([6])


def test_paper_subsets():
    sub = imagenet_val_subset()
    assert len(sub) == 100 and sub[0] == 0 and sub[-1] == 49500 and torch.all(sub.diff() == 500)
    assert every_kth(10, 3).tolist() == [0, 3, 6, 9]
    assert every_kth(10, 4, start=1).tolist() == [1, 5, 9]
    dp = diffpure_subset(10000, 64, data_seed=0)
    assert dp.tolist() == np.random.RandomState(0).choice(10000, 64, replace=False).tolist()
    assert len(set(dp.tolist())) == 64
    with pytest.raises(SdepureError):
        every_kth(10, 0)
