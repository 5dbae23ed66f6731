"""Score-model families: each adapts a checkpoint to the DiffusionModel calling convention."""
from __future__ import annotations

from ..errors import SdepureError
from ..loaders import load_sdepure
from ..schedules import schedule_from_config
from .base import DiffusionModel, EpsNetModel
from .digits import DigitsEpsMLP, DigitsEpsNet

SCORE_FAMILIES = {
    "digits-eps-mlp": "sdepure's residual MLP eps-net for 8x8 digits (sdepure weights file)",
    "digits-eps-conv": "sdepure's small conv eps-net for 8x8 digits (sdepure weights file)",
}
_BUILDERS = {"digits-eps-mlp": DigitsEpsMLP, "digits-eps-conv": DigitsEpsNet}


def build_score_model(cfg: dict, allow_pickle: bool = False) -> DiffusionModel:
    """cfg: the [model] table of a config (family, weights, time_input, schedule)."""
    family = cfg.get("family")
    if family not in SCORE_FAMILIES:
        raise SdepureError(f"unknown score-model family {family!r}; known: {', '.join(SCORE_FAMILIES)}")
    if "weights" not in cfg:
        raise SdepureError(f"model family {family} needs a weights file (model.weights)")
    schedule = schedule_from_config(cfg.get("schedule", {"kind": "linear"}))
    net, _ = load_sdepure(cfg["weights"], family, _BUILDERS[family], allow_pickle)
    return EpsNetModel(net, schedule, time_input=cfg.get("time_input", "t")).eval()


__all__ = ["DiffusionModel", "EpsNetModel", "SCORE_FAMILIES", "build_score_model"]
