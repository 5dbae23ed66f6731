"""Score-model families: each adapts a checkpoint family to the DiffusionModel calling convention
(eps at continuous t in [0, 1] on [-1, 1] images) and brings its own schedule, so t* follows the
checkpoint."""
from __future__ import annotations

from ..errors import SdepureError
from ..loaders import load_sdepure
from ..schedules import LinearVP, schedule_from_config
from .base import DiffusionModel, EpsNetModel
from .digits import DigitsEpsMLP, DigitsEpsNet

# family -> (what it is, the file it expects)
SCORE_FAMILIES = {
    "digits-eps-mlp": ("sdepure's residual-MLP eps-network for 8x8 digits",
                       "an sdepure weights file (sdepure train digits)"),
    "digits-eps-conv": ("sdepure's small conv eps-network for 8x8 digits", "an sdepure weights file"),
    "adm": ("ADM UNet of guided-diffusion / improved-diffusion; preset guided-256-uncond "
            "(linear T=1000) or improved-cifar10-uncond (cosine T=4000, learned sigma); schedule / "
            "time_input replace the preset's (diffpure-imagenet: continuous VP, floor(1000t))",
            "256x256_diffusion_uncond.pt or cifar10_uncond_50M_500K.pt: a flat state dict"),
    "score-sde": ("score_sde NCSN++/DDPM++ for the continuous VP SDE (beta 0.1..20, time input 999 t); preset "
                  "ddpmpp-deep-continuous (DiffPure's CIFAR-10), ddpmpp-continuous, ncsnpp-*",
                  "checkpoint_8.pth: {model, ema, optimizer, step}; the EMA weights are used"),
    "diffusers": ("a diffusers UNet2DModel with its scheduler's alpha_bar table (optional extra: "
                  "pip install 'sdepure[diffusers]')",
                  "a local pipeline directory (unet/, scheduler/) or UNet directory; safetensors"),
}
_SDEPURE_NETS = {"digits-eps-mlp": DigitsEpsMLP, "digits-eps-conv": DigitsEpsNet}


def build_score_model(cfg: dict, allow_pickle: bool = False) -> DiffusionModel:
    """cfg: the [model] table of a config: family, weights, and the family's own keys
    (preset, an [model.arch] table of constructor settings for non-preset networks, ...)."""
    family = cfg.get("family")
    if family not in SCORE_FAMILIES:
        raise SdepureError(f"unknown score-model family {family!r}; known: {', '.join(SCORE_FAMILIES)}")
    if "weights" not in cfg:
        raise SdepureError(f"model family {family} needs a weights file (model.weights or --model-weights)")
    weights = cfg["weights"]
    if family in _SDEPURE_NETS:
        schedule = schedule_from_config(cfg.get("schedule", {"kind": "linear"}))
        net, _ = load_sdepure(weights, family, _SDEPURE_NETS[family], allow_pickle)
        return EpsNetModel(net, schedule, time_input=cfg.get("time_input", "t")).eval()
    if family == "adm":
        from .adm import ADM_DIFFUSION, adm_eps_model, load_adm

        preset = cfg.get("preset")
        if preset not in ADM_DIFFUSION:
            raise SdepureError(f"model family adm needs preset = one of {', '.join(ADM_DIFFUSION)}")
        net = load_adm(weights, _with_arch("adm", preset, cfg), allow_pickle)
        return adm_eps_model(net, preset, schedule=cfg.get("schedule"), time_input=cfg.get("time_input"))
    if family == "score-sde":
        from .ncsnpp import PRESETS, load_score_sde

        preset = cfg.get("preset")
        if preset not in PRESETS:
            raise SdepureError(f"model family score-sde needs preset = one of {', '.join(PRESETS)}")
        net = load_score_sde(weights, _with_arch("score-sde", preset, cfg), allow_pickle)
        return EpsNetModel(net, LinearVP(0.1, 20.0), time_input="999t").eval()
    from .diffusers_adapter import load_diffusers

    return load_diffusers(weights, allow_pickle=allow_pickle, subfolder=cfg.get("subfolder")).eval()


def _with_arch(family: str, preset: str, cfg: dict):
    """The preset's name, or its settings updated by the config's [model.arch] table."""
    arch = cfg.get("arch")
    if not arch:
        return preset
    if not isinstance(arch, dict):
        raise SdepureError("[model.arch] must be a table of architecture settings")
    if family == "adm":
        from .adm import adm_config as preset_config
    else:
        from .ncsnpp import ncsnpp_config as preset_config
    return {**preset_config(preset), **arch}


__all__ = ["DiffusionModel", "EpsNetModel", "SCORE_FAMILIES", "build_score_model"]
