"""How the networks run: autocast precision and memory layout (results of bf16/fp16 differ from fp32).

precision "fp32" (default) runs the score network and the classifier as they are; "bf16" and
"fp16" run them under torch.autocast on their device (convolutions and matrix products in the
lower precision) and hand fp32 results back, so the solver state and its arithmetic stay fp32.
channels_last: convolution weights in NHWC order let cuDNN pick its fast kernels on CUDA (a conv
with channels_last weights converts its input itself); on the CPU it is left off.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import SdepureError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise SdepureError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def autocast(device, precision: str):
    """The context a network call runs in."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def run(fn, x: torch.Tensor, *args, precision: str = "fp32") -> torch.Tensor:
    """fn(x, *args) under `precision`, returned in x's dtype."""
    if precision == "fp32":
        return fn(x, *args)
    with autocast(x.device, precision):
        out = fn(x, *args)
    return out.to(x.dtype)


class Autocast(nn.Module):
    """`module` (a classifier: x -> logits) called under `precision`, results in x's dtype."""

    def __init__(self, module: nn.Module, precision: str):
        super().__init__()
        check_precision(precision)
        self.module, self.precision = module, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.module, x, precision=self.precision)


def with_precision(module: nn.Module, precision: str) -> nn.Module:
    """The module itself at fp32, else its Autocast wrapper."""
    check_precision(precision)
    return module if precision == "fp32" else Autocast(module, precision)


def prepare(module: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """Convert `module`'s 4-D weights to channels_last in place when asked, or (None) when it holds
    convolutions and lives on CUDA. Returns the module."""
    if channels_last is None:
        params = list(module.parameters())
        channels_last = (bool(params) and params[0].device.type == "cuda"
                         and any(isinstance(m, nn.Conv2d) for m in module.modules()))
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module
