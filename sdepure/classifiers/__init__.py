"""Classifier families: every classifier takes [0, 1] images and returns logits."""
from __future__ import annotations

from torch import nn

from ..errors import SdepureError
from ..loaders import load_sdepure
from .digits import DigitsCNN

CLASSIFIER_FAMILIES = {"digits-cnn": "sdepure's small CNN for 8x8 digits (sdepure weights file)"}
_BUILDERS = {"digits-cnn": DigitsCNN}


def build_classifier(cfg: dict, allow_pickle: bool = False) -> nn.Module:
    """cfg: the [classifier] table of a config (family, weights)."""
    family = cfg.get("family")
    if family not in CLASSIFIER_FAMILIES:
        raise SdepureError(f"unknown classifier family {family!r}; known: {', '.join(CLASSIFIER_FAMILIES)}")
    if "weights" not in cfg:
        raise SdepureError(f"classifier family {family} needs a weights file (classifier.weights)")
    net, _ = load_sdepure(cfg["weights"], family, _BUILDERS[family], allow_pickle)
    return net.eval()


__all__ = ["CLASSIFIER_FAMILIES", "build_classifier"]
