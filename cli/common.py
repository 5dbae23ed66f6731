"""Helpers shared by the commands: devices, output directories."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from sdepure.errors import SdepureError


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SdepureError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdepureError("--device cuda requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SdepureError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def default_out(kind: str, *parts) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("sdepure-runs") / "-".join([kind, *map(str, parts), stamp])


def check_out(out: Path) -> Path:
    """Refuse an existing output; check the nearest existing parent is writable."""
    if out.exists():
        raise SdepureError(f"output {out} already exists; choose another --out (nothing was overwritten)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SdepureError(f"cannot write output {out}: {parent} is not a writable directory")
    return out


def make_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SdepureError(f"output {out} already exists; choose another --out (nothing was overwritten)") from None
    except OSError as e:
        raise SdepureError(f"cannot create output directory {out}: {e.strerror}") from None
    return out
