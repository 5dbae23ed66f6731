"""Hugging Face diffusers `UNet2DModel` directories (e.g. google/ddpm-cifar10-32), loaded offline.

diffusers is an optional dependency (pip install 'sdepure[diffusers]'), imported only when loading.
Two layouts are accepted:
  * a pipeline directory: model_index.json, unet/{config.json, diffusion_pytorch_model.*},
    scheduler/scheduler_config.json (as save_pretrained of a DDPMPipeline writes it);
  * a bare UNet directory (config.json + weights), with scheduler_config.json next to it, in
    ../scheduler/, or given separately (`scheduler=`: a JSON file, a directory or a dict).

Facts checked against diffusers 0.42 (schedulers/scheduling_ddpm.py, models/unets/unet_2d.py,
models/modeling_utils.py):
  * the UNet is called with the training index i = 0..T-1 whose noise level is
    alphas_cumprod[i] (add_noise indexes the table by the timestep), i.e. sdepure's "index" time
    input; the positional embedding takes fractional indices.
  * betas: linear = linspace(beta_start, beta_end, T); scaled_linear = linspace(sqrt(beta_start),
    sqrt(beta_end), T)^2; squaredcos_cap_v2 = min(1 - f((i+1)/T) / f(i/T), 0.999) with
    f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2 (the improved-diffusion cosine, DiscreteVP.cosine);
    sigmoid = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start; trained_betas
    overrides all. DDIM, PNDM, DPM-Solver, Euler, LMS, Heun, UniPC, ... share these formulas.
    diffusers computes them in float32, sdepure in float64: alpha_bar differs by <= 1.3e-5 relative
    (the cosine tail; ~1e-6 elsewhere).
  * learned variance: 2C output channels, the first C being the prediction.
  * from_pretrained(use_safetensors=True) never falls back to .bin; missing or unexpected keys
    are only logged by diffusers, so they are checked here.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SdepureError, first_line
from ..loaders import resolve_path
from ..schedules import DiscreteVP
from .base import EpsNetModel

INSTALL_HINT = "pip install 'sdepure[diffusers]'"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CONFIG = "scheduler_config.json"
SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
# discrete-VP schedulers whose betas were checked to equal DDPMScheduler's for the same settings
VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
    "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "SASolverScheduler", "DPMSolverSDEScheduler",
    "LCMScheduler", "TCDScheduler", "RePaintScheduler",
)
# DDPMScheduler's defaults, used for keys a config omits when diffusers cannot tell the class's own
DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
                 "rescale_betas_zero_snr": False}


def _diffusers_or_none():
    # belt and braces: a local-directory check plus local_files_only already keep loading offline;
    # huggingface_hub reads these once, at import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _import_diffusers():
    diffusers = _diffusers_or_none()
    if diffusers is None:
        raise SdepureError(f"loading diffusers models needs the diffusers package; install it with: {INSTALL_HINT}")
    return diffusers


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SdepureError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdepureError(f"cannot read {what} {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise SdepureError(f"{what} {path} is not a JSON object")
    return data


# ----------------------------------------------------------------------------- noise schedule

def _scheduler_defaults(class_name: str | None) -> dict:
    """Defaults diffusers would fill in for keys the config omits (they differ between classes)."""
    defaults = dict(DDPM_DEFAULTS)
    if class_name is None:
        return defaults
    try:
        params = inspect.signature(getattr(_diffusers_or_none(), class_name).__init__).parameters
    except Exception:  # diffusers missing or class renamed: DDPM's defaults are the usual ones
        return defaults
    for key in defaults:
        if key in params and params[key].default is not inspect.Parameter.empty:
            defaults[key] = params[key].default
    return defaults


def schedule_from_scheduler_config(cfg: dict, source: str = "scheduler config") -> tuple[DiscreteVP, str]:
    """(DiscreteVP table of alphas_cumprod, prediction_type) from a diffusers scheduler config dict."""
    class_name = cfg.get("_class_name")
    if class_name is not None and class_name not in VP_SCHEDULERS:
        raise SdepureError(f"{source}: scheduler {class_name} is not a supported discrete VP (beta) "
                           f"scheduler; supported: DDPMScheduler, DDIMScheduler, PNDMScheduler, ...")
    c = {**_scheduler_defaults(class_name), **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    pred = c["prediction_type"] or "epsilon"
    if pred not in PREDICTION_TYPES:
        raise SdepureError(f"{source}: prediction_type {pred!r} is not supported; "
                           f"supported: {', '.join(PREDICTION_TYPES)}")
    if c.get("rescale_betas_zero_snr"):
        raise SdepureError(f"{source}: rescale_betas_zero_snr makes alpha_bar reach 0 at the last step, "
                           "which sdepure's table schedule cannot represent")
    try:
        T = int(c["num_train_timesteps"])
        b0, b1 = float(c["beta_start"]), float(c["beta_end"])
    except (TypeError, ValueError) as e:
        raise SdepureError(f"{source}: bad num_train_timesteps / beta_start / beta_end ({first_line(e)})") from None
    if T < 1:
        raise SdepureError(f"{source}: num_train_timesteps must be >= 1, got {T}")
    kind = c["beta_schedule"]
    try:
        if c.get("trained_betas") is not None:
            table = DiscreteVP.from_betas(np.asarray(c["trained_betas"], dtype=np.float64))
            table.kind = "diffusers-trained_betas"
            return table, pred
        if kind == "linear":
            betas = np.linspace(b0, b1, T, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            # same formula as improved-diffusion (s = 0.008, betas capped at 0.999)
            table = DiscreteVP.cosine(T=T, s=0.008, max_beta=0.999)
            table.kind = "diffusers-squaredcos_cap_v2"
            return table, pred
        elif kind == "sigmoid":
            betas = b0 + (b1 - b0) / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
        else:
            raise SdepureError(f"beta_schedule {kind!r} is not supported; supported: "
                               f"{', '.join(BETA_SCHEDULES)} or trained_betas")
        table = DiscreteVP(np.cumprod(1.0 - betas), kind=f"diffusers-{kind}")
    except SdepureError as e:
        raise SdepureError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise SdepureError(f"{source}: bad betas ({first_line(e)})") from None
    return table, pred


# ----------------------------------------------------------------------------- network wrapper

class DiffusersEpsNet(nn.Module):
    """net(x, index) -> eps for a diffusers UNet2DModel; converts v / x0 predictions to eps.

    With learned variance (2C output channels) the variance channels are passed through after
    the C eps channels, so EpsNetModel(learned_sigma=True) slices them off."""

    def __init__(self, unet: nn.Module, schedule: DiscreteVP, prediction_type: str = "epsilon",
                 learned_sigma: bool = False):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise SdepureError(f"prediction_type {prediction_type!r} is not supported")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.learned_sigma = learned_sigma
        cfg = unet.config
        self.in_channels = int(cfg.in_channels)
        self.sample_size = cfg.sample_size

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, index).sample
        if self.prediction_type == "epsilon":
            return out
        c = x.shape[1]
        pred, rest = out[:, :c], out[:, c:]
        # same interpolated alpha_bar as EpsNetModel uses for x0 / score
        ab = self.schedule.alpha_bar(self.schedule.time_of_index(index.detach().to(torch.float64)))
        ab = ab.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "v_prediction":  # v = a eps - s x0
            eps = a * pred + s * x
        else:  # "sample": x = a x0 + s eps
            eps = (x - a * pred) / s
        return torch.cat([eps, rest], dim=1) if self.learned_sigma else eps


# ----------------------------------------------------------------------------- directory layout

def _find_unet_dir(root: Path, subfolder: str | None) -> tuple[Path, Path | None]:
    """(UNet directory, pipeline root or None)."""
    if subfolder is not None:
        return root / subfolder, root
    index_path = root / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path, "pipeline index")
        unets = [k for k, v in index.items()
                 if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] == UNET_CLASS]
        if len(unets) == 1:
            return root / unets[0], root
        if len(unets) > 1:
            raise SdepureError(f"{index_path} lists several UNet2DModels ({', '.join(unets)}); pass subfolder")
        others = [f"{k} ({v[1]})" for k, v in index.items()
                  if isinstance(v, list) and len(v) == 2 and "UNet" in str(v[1])]
        raise SdepureError(f"{index_path} has no {UNET_CLASS} component"
                           + (f" (found {', '.join(others)}; only {UNET_CLASS} is supported)" if others else ""))
    if (root / "config.json").is_file():
        return root, None
    if (root / "unet" / "config.json").is_file():
        return root / "unet", root
    raise SdepureError(f"{root} is neither a diffusers pipeline directory (model_index.json, unet/) "
                       "nor a UNet directory (config.json)")


def _scheduler_config(scheduler, unet_dir: Path, root: Path | None) -> tuple[dict, str]:
    if isinstance(scheduler, dict):
        return scheduler, "scheduler config"
    if scheduler is not None:
        p = resolve_path(str(scheduler), "scheduler config")
        p = p / SCHEDULER_CONFIG if p.is_dir() else p
        return _read_json(p, "scheduler config"), str(p)
    candidates = []
    if root is not None:
        candidates.append(root / "scheduler" / SCHEDULER_CONFIG)
    candidates += [unet_dir / SCHEDULER_CONFIG, unet_dir.parent / "scheduler" / SCHEDULER_CONFIG]
    for p in dict.fromkeys(candidates):
        if p.is_file():
            return _read_json(p, "scheduler config"), str(p)
    raise SdepureError(f"no scheduler config for {unet_dir}: looked for "
                       f"{', '.join(str(p) for p in dict.fromkeys(candidates))}; pass scheduler=")


def _weights_policy(unet_dir: Path, allow_pickle: bool) -> bool:
    """use_safetensors for from_pretrained; refuses pickled .bin weights unless allowed."""
    if any((unet_dir / n).is_file() for n in SAFE_WEIGHTS):
        return True
    pickled = [n for n in PICKLE_WEIGHTS if (unet_dir / n).is_file()]
    if not pickled:
        raise SdepureError(f"no weights in {unet_dir}: expected {SAFE_WEIGHTS[0]} (or {PICKLE_WEIGHTS[0]})")
    if not allow_pickle:
        raise SdepureError(f"refused to unpickle {unet_dir / pickled[0]}: only pickled .bin weights and no "
                           f"{SAFE_WEIGHTS[0]}; load it with --allow-pickle only if you trust its source")
    return False


# ----------------------------------------------------------------------------- loader

def load_diffusers(path, allow_pickle: bool = False, subfolder: str | None = None,
                   scheduler=None, t_min: float | None = None) -> EpsNetModel:
    """Load a diffusers UNet2DModel + its noise schedule from a local directory as an EpsNetModel
    (continuous t in [0, 1] fed as the fractional table index t T - 1). Never touches the network.

    path: a pipeline directory or a bare UNet directory; subfolder: the UNet's folder inside a
    pipeline (found from model_index.json by default); scheduler: a scheduler_config.json path,
    its directory or a dict, overriding the one found next to the UNet."""
    _import_diffusers()  # before anything imports huggingface_hub, so the offline settings apply
    root = resolve_path(str(path), "diffusers model directory")
    if not root.is_dir():
        raise SdepureError(f"diffusers model directory not found: {root}")
    unet_dir, pipe_root = _find_unet_dir(root, subfolder)
    if not unet_dir.is_dir():
        raise SdepureError(f"UNet directory not found: {unet_dir}")
    cfg = _read_json(unet_dir / "config.json", "UNet config")
    cls = cfg.get("_class_name")
    if cls != UNET_CLASS:
        raise SdepureError(f"{unet_dir / 'config.json'} describes {cls!r}; only {UNET_CLASS} is supported")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise SdepureError(f"{unet_dir}: time_embedding_type {cfg['time_embedding_type']!r} is not supported "
                           "(needs 'positional': 'fourier' is a VE model, 'learned' takes integer steps only)")
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise SdepureError(f"{unet_dir}: class-conditional UNets are not supported (purification is unconditional)")
    sched_cfg, sched_src = _scheduler_config(scheduler, unet_dir, pipe_root)
    schedule, prediction_type = schedule_from_scheduler_config(sched_cfg, sched_src)
    use_safetensors = _weights_policy(unet_dir, allow_pickle)

    diffusers = _import_diffusers()
    try:
        unet, info = diffusers.UNet2DModel.from_pretrained(
            str(unet_dir), local_files_only=True, use_safetensors=use_safetensors,
            torch_dtype=torch.float32, output_loading_info=True,
            # without accelerate diffusers would warn and fall back to this anyway
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as e:  # corrupt file, wrong shapes, truncated download, ...
        raise SdepureError(f"cannot load UNet weights from {unet_dir}: {first_line(e)}") from None
    bad = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    bad = {k: list(v) for k, v in bad.items() if v}
    if bad:
        def show(keys):
            keys = [str(k) for k in keys]
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise SdepureError(f"weights in {unet_dir} do not match its config: "
                           + "; ".join(f"{k.replace('_', ' ')}: {show(v)}" for k, v in bad.items()))

    c_in, c_out = int(unet.config.in_channels), int(unet.config.out_channels)
    if c_out not in (c_in, 2 * c_in):
        raise SdepureError(f"{unet_dir}: out_channels {c_out} is neither in_channels {c_in} nor twice it")
    learned_sigma = c_out == 2 * c_in
    net = DiffusersEpsNet(unet.eval(), schedule, prediction_type, learned_sigma)
    return EpsNetModel(net, schedule, time_input="index", learned_sigma=learned_sigma, t_min=t_min).eval()


__all__ = ["DiffusersEpsNet", "load_diffusers", "schedule_from_scheduler_config", "INSTALL_HINT"]
