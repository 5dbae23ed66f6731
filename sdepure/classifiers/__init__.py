"""Classifier families: every classifier takes [0, 1] images and returns logits."""
from __future__ import annotations

from torch import nn

from ..errors import SdepureError
from ..loaders import load_sdepure
from .digits import DigitsCNN

# family -> (what it is, the file it expects)
CLASSIFIER_FAMILIES = {
    "digits-cnn": ("sdepure's small CNN for 8x8 digits", "an sdepure weights file (sdepure train digits)"),
    "wideresnet": ("WideResNet (RobustBench CIFAR-10 'Standard' is depth 28, widen 10); [0, 1] input, "
                   "no normalisation", "a state dict, optionally under 'state_dict', keys optionally "
                   "prefixed 'module.' or 'model.'"),
    "timm": ("a timm model by name (optional: pip install timm), resized and normalised as configured",
             "a local state dict for timm.create_model(name)"),
    "torchvision": ("a torchvision model by name (optional: pip install torchvision), resized and "
                    "normalised as configured", "a local state dict for torchvision.models.get_model(name)"),
}
_ADAPTER_KEYS = ("input_size", "interpolation", "antialias", "mean", "std")


def _adapter_kwargs(cfg: dict) -> dict:
    """Resize/normalise settings: a named paper preset (adapter = "...") updated by explicit keys."""
    from .external import PAPER_INPUTS

    out = {}
    if "adapter" in cfg:
        if cfg["adapter"] not in PAPER_INPUTS:
            raise SdepureError(f"unknown classifier adapter {cfg['adapter']!r}; known: {', '.join(PAPER_INPUTS)}")
        out = {("input_size" if k == "size" else k): v for k, v in PAPER_INPUTS[cfg["adapter"]].items()}
    out.update({k: cfg[k] for k in _ADAPTER_KEYS if k in cfg})
    return out


def build_classifier(cfg: dict, allow_pickle: bool = False, num_classes: int | None = None) -> nn.Module:
    """cfg: the [classifier] table of a config (family, weights, and the family's own keys)."""
    family = cfg.get("family")
    if family not in CLASSIFIER_FAMILIES:
        raise SdepureError(f"unknown classifier family {family!r}; known: {', '.join(CLASSIFIER_FAMILIES)}")
    if "weights" not in cfg:
        raise SdepureError(f"classifier family {family} needs a weights file "
                           f"(classifier.weights or --classifier-weights)")
    weights = cfg["weights"]
    if family == "digits-cnn":
        net, _ = load_sdepure(weights, family, DigitsCNN, allow_pickle)
        return net.eval()
    if family == "wideresnet":
        from .wideresnet import load_wideresnet

        return load_wideresnet(weights, depth=int(cfg.get("depth", 28)), widen=int(cfg.get("widen", 10)),
                               allow_pickle=allow_pickle, num_classes=num_classes or 10).eval()
    if "name" not in cfg:
        raise SdepureError(f"classifier family {family} needs a model name (classifier.name)")
    from .external import load_timm_classifier, load_torchvision_classifier

    load = load_timm_classifier if family == "timm" else load_torchvision_classifier
    kwargs = _adapter_kwargs(cfg)
    if family == "torchvision":
        kwargs.setdefault("input_size", None)
    return load(cfg["name"], weights, num_classes=cfg.get("num_classes"), allow_pickle=allow_pickle, **kwargs).eval()


__all__ = ["CLASSIFIER_FAMILIES", "build_classifier"]
