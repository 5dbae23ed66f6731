"""WideResNet for CIFAR-10 (Zagoruyko & Komodakis 2016), pre-activation variant, written for sdepure
so that RobustBench's CIFAR-10 'Standard' checkpoint (WRN-28-10, used as DiffPure's CIFAR-10
classifier) loads with load_state_dict(strict=True).

Only names, shapes and layer order follow RobustBench (robustbench/model_zoo/architectures/
wide_resnet.py and model_zoo/cifar10.py, entry 'Standard' = WideResNet(depth=28, widen_factor=10)):

    conv1                           Conv2d(3, 16, 3, pad 1, no bias)
    block{1,2,3}.layer.{i}          n = (depth - 4) / 6 blocks per stage, widths 16k, 32k, 64k
                                    (k = widen), stride 1, 2, 2 on each stage's first block
        .bn1 .conv1 .bn2 .conv2     BN(in) ReLU Conv3x3(in->out, stride), BN ReLU Conv3x3(out->out)
        .convShortcut               Conv1x1(in->out, stride, no bias), only when in != out
    bn1                             BatchNorm2d(64k), then ReLU and 8x8 average pooling
    fc                              Linear(64k, num_classes) with bias

In a block whose width changes, the shortcut takes the pre-activated input relu(bn1(x)); in a
block whose width is kept, it takes x itself. No dropout (RobustBench's dropRate is 0).
'Standard' has no normalisation layer: it takes [0, 1] images as they are (RobustBench's
convention; DiffPure feeds it (x + 1) / 2). The checkpoint stores only this state dict, so the
loader below needs no pickled classes.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdepureError
from ..loaders import load_checkpoint, load_state_dict_strict, resolve_path


class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        # registered only when needed, so the key exists exactly where RobustBench has it
        if c_in != c_out:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        else:
            self.convShortcut = None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return h + (x if self.convShortcut is None else self.convShortcut(a))


class _Stage(nn.Module):
    """Holds its blocks under `.layer` because the checkpoint keys are blockN.layer.i.*"""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen on 32x32 [0, 1] images; returns logits."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise SdepureError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen < 1:
            raise SdepureError(f"WideResNet widen factor must be >= 1, got {widen}")
        self.config = {"depth": depth, "widen": widen, "num_classes": num_classes}
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = _Stage(n, w[0], w[1], 1)
        self.block2 = _Stage(n, w[1], w[2], 2)
        self.block3 = _Stage(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init, fan-out, as in the WRN papers' code
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        h = F.relu(self.bn1(h))
        # global average = RobustBench's avg_pool2d(h, 8) on the 8x8 map of a 32x32 input
        return self.fc(h.mean(dim=(2, 3)))


# Keys under which training scripts nest a state dict, and prefixes that wrappers add to every key
# (DataParallel 'module.', RobustBench's own 'model.' wrappers); both as in RobustBench's loader.
WRAPPER_KEYS = ("state_dict", "model")
KEY_PREFIXES = ("module.", "model.")


def extract_state_dict(ckpt, own_keys: Iterable[str] | None = None, wrappers=WRAPPER_KEYS,
                       prefixes=KEY_PREFIXES, what: str = "checkpoint") -> dict:
    """The {name: tensor} dict inside a loaded checkpoint: unwrap the first of `wrappers` present,
    then strip `prefixes` (repeatedly, so 'module.model.' goes too). With `own_keys` (the target
    module's state-dict keys), a key that already names one of them is left alone, so a model
    whose own names start with 'model.' is not damaged."""
    if not isinstance(ckpt, dict):
        raise SdepureError(f"{what}: expected a state dict, got {type(ckpt).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        inner = next((ckpt[k] for k in wrappers if isinstance(ckpt.get(k), dict)), None)
        if inner is None:
            keys = ", ".join(map(str, list(ckpt)[:6]))
            raise SdepureError(f"{what}: no state dict found (top-level keys: {keys}; "
                               f"expected tensors or one of {', '.join(wrappers)})")
        ckpt = inner
    own = set(own_keys) if own_keys is not None else None
    state = {}
    for k, v in ckpt.items():
        if not isinstance(k, str):
            raise SdepureError(f"{what}: state dict key {k!r} is not a string")
        while not (own is not None and k in own):
            p = next((p for p in prefixes if k.startswith(p)), None)
            if p is None:
                break
            k = k[len(p):]
        if k in state:
            raise SdepureError(f"{what}: two entries map to {k!r} after stripping prefixes")
        state[k] = v
    return state


def fill_num_batches_tracked(module: nn.Module, state: dict) -> dict:
    """Checkpoints saved before PyTorch 0.4.1 (e.g. torchvision's original ImageNet weights) lack
    BatchNorm's num_batches_tracked counter; PyTorch's BatchNorm fills it in, so do the same when
    the layer's running statistics are present. The counter only matters for momentum=None training."""
    out = dict(state)
    for k, v in module.state_dict().items():
        if k.split(".")[-1] == "num_batches_tracked" and k not in out:
            base = k[: -len("num_batches_tracked")]
            if base + "running_mean" in out:
                out[k] = torch.zeros_like(v, device="cpu")
    return out


def load_wideresnet(path, depth: int = 28, widen: int = 10, allow_pickle: bool = False,
                    num_classes: int = 10) -> WideResNet:
    """Load a WideResNet checkpoint (e.g. RobustBench's cifar10/Linf/Standard.pt) strictly.

    Accepts a plain state dict, one nested under 'state_dict' (or 'model'), and keys prefixed with
    'module.' or 'model.'. Read with torch.load(weights_only=True) unless allow_pickle.
    Returns the network in eval mode; it expects [0, 1] inputs (no normalisation)."""
    net = WideResNet(depth, widen, num_classes)
    state = extract_state_dict(load_checkpoint(path, allow_pickle), net.state_dict().keys(),
                               what=str(resolve_path(str(path))))
    load_state_dict_strict(net, fill_num_batches_tracked(net, state), f"wideresnet-{depth}-{widen}")
    return net.eval()


__all__ = ["WideResNet", "load_wideresnet", "extract_state_dict", "fill_num_batches_tracked"]
