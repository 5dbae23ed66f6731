"""Helpers shared by the commands: devices, output directories."""
from __future__ import annotations

import os
import time
from pathlib import Path

import click
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


def common_options(command):
    """--seed, --device, --out, --allow-pickle and the path overrides, shared by the commands."""
    for option in reversed([
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--out", type=click.Path(path_type=Path), help="New output directory (must not exist)."),
        click.option("--allow-pickle", is_flag=True, help="Allow unpickling weight files (runs their code)."),
    ]):
        command = option(command)
    return path_options(command)


def path_options(command):
    """--model-weights / --classifier-weights / --data-root: override the config's paths."""
    command = click.option("--data-root", type=str, help="Dataset directory (overrides data.root).")(command)
    command = click.option("--classifier-weights", type=str,
                           help="Classifier weights file (overrides classifier.weights).")(command)
    command = click.option("--model-weights", type=str,
                           help="Diffusion-model weights (overrides model.weights).")(command)
    return command


def apply_paths(cfg: dict, model_weights: str | None, classifier_weights: str | None,
                data_root: str | None) -> dict:
    for table, key, value in (("model", "weights", model_weights), ("classifier", "weights", classifier_weights),
                              ("data", "root", data_root)):
        if value is not None:
            cfg.setdefault(table, {})[key] = value
    return cfg
