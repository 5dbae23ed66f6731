"""Helpers shared by the commands: devices, output directories."""
from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from sdepure.errors import SdepureError
from sdepure.report import check_out, make_out  # noqa: F401 (the commands' shared helpers)


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
