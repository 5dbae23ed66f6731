"""Checkpoint loading: safe by default, strict about keys, one builder per model family.

sdepure's own weight files are dicts {"format": "sdepure", "family", "arch", "state_dict",
"meta"} saved with torch.save and read with torch.load(weights_only=True): tensors and plain
containers only, nothing that executes code while loading.
"""
from __future__ import annotations

import os
import pickle
import re
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import SdepureError, first_line

BUILTIN_PREFIX = "builtin:"


def expand_path(spec: str, what: str = "path") -> Path:
    """~ and $VAR / ${VAR} expanded; an unset variable is an error that names it."""
    expanded = os.path.expandvars(os.path.expanduser(spec))
    match = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if match:
        raise SdepureError(f"{what} {spec!r} uses the environment variable {match.group(1)}, which is not set; "
                           f"set it or pass the path on the command line")
    return Path(expanded)


def resolve_path(spec: str, what: str = "weights") -> Path:
    """'builtin:NAME' names a file shipped in sdepure/weights; anything else is a path
    (environment variables and ~ are expanded)."""
    if spec.startswith(BUILTIN_PREFIX):
        return Path(str(resources.files("sdepure.weights") / spec[len(BUILTIN_PREFIX):]))
    return expand_path(spec, what)


def load_checkpoint(spec: str | Path, allow_pickle: bool = False):
    """torch.load with weights_only=True unless the caller explicitly allows unpickling."""
    path = resolve_path(str(spec))
    if not path.is_file():
        raise SdepureError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise SdepureError(f"cannot read weights file {path}: {first_line(e)}") from None
        raise SdepureError(
            f"refused to unpickle {path}: it holds more than tensors and plain containers "
            f"({first_line(e)}); load it with --allow-pickle only if you trust its source") from None
    except Exception as e:  # truncated zip, random bytes, wrong magic number, ...
        raise SdepureError(f"cannot read weights file {path}: corrupt or not a torch file ({first_line(e)})") from None



def load_state_dict_strict(module: nn.Module, state: dict, family: str) -> None:
    """load_state_dict(strict=True) with an error that names what is missing and unexpected."""
    if not isinstance(state, dict):
        raise SdepureError(f"{family}: expected a state dict, got {type(state).__name__}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "") if keys else "none"
        raise SdepureError(f"checkpoint does not match family {family}: missing keys: {show(missing)}; "
                           f"unexpected keys: {show(unexpected)}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise SdepureError(f"checkpoint does not match family {family}: {k} has shape "
                           f"{tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)


def save_sdepure(path: Path, family: str, net: nn.Module, meta: dict, dtype: torch.dtype | None = None) -> None:
    """Write an sdepure weights file; `dtype` (e.g. float16) shrinks floating tensors on disk,
    load_state_dict casts them back to the parameters' dtype."""
    def cast(v):
        v = v.detach().cpu()
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v
    torch.save({"format": "sdepure", "family": family, "arch": dict(net.config),
                "state_dict": {k: cast(v) for k, v in net.state_dict().items()}, "meta": meta}, path)


def load_sdepure(spec: str, family: str, build: Callable[..., nn.Module], allow_pickle: bool = False) -> tuple[nn.Module, dict]:
    """Load a file written by save_sdepure and check it is of `family`."""
    ckpt = load_checkpoint(spec, allow_pickle)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sdepure" or "state_dict" not in ckpt:
        raise SdepureError(f"{resolve_path(str(spec))} is not an sdepure weights file (family {family} expected)")
    if ckpt.get("family") != family:
        raise SdepureError(f"{resolve_path(str(spec))} holds family {ckpt.get('family')!r}, expected {family!r}")
    try:
        net = build(**ckpt.get("arch", {}))
    except TypeError as e:
        raise SdepureError(f"bad architecture settings in {spec}: {e}") from None
    load_state_dict_strict(net, ckpt["state_dict"], family)
    return net.eval(), ckpt.get("meta", {})
