"""Classifiers from timm or torchvision, built by name and filled from a local weights file, behind
an adapter that takes sdepure's [0, 1] images.

Neither package is a dependency of sdepure: each is imported only when asked for, and a missing
one is an SdepureError with the pip command. Nothing is ever downloaded: timm models are built
with create_model(name, pretrained=False), torchvision ones with get_model(name, weights=None),
and the weights come from the file given.

InputAdapter does what every paper's glue code does between a diffusion model's output and a
classifier: resize to the classifier's input size, then normalise. What the papers used:
  * Carlini et al. 2023 (ethz-spylab/diffusion_denoised_smoothing, imagenet/DRM.py): the denoised
    [-1, 1] image goes to timm beit_large_patch16_512 after F.interpolate(..., (512, 512),
    mode='bicubic', antialias=True); [-1, 1] is exactly BEiT's mean = std = 0.5 normalisation.
    CIFAR-10: the same into a 224x224 ViT (HF aaraki/vit-base-patch16-224-in21k-finetuned-cifar10).
  * DensePure (Jayfeather1024/DensePure, eval_certified_densepure.py): F.interpolate bicubic to
    512 for BEiT, 224 for other timm models, antialias off; [-1, 1] input to BEiT.
  * DiffPure (NVlabs/DiffPure, eval_sde_adv.py): bilinear, antialias off, 256 -> 224, then ImageNet
    mean/std inside its torchvision ResNet wrapper.
antialias=True makes F.interpolate compute what PIL's Image.resize computes (checked to ~1e-7 for
bilinear and bicubic, both directions): a low-pass when shrinking and, for bicubic, PIL's cubic
(a = -0.5) instead of torch's default (a = -0.75) even when enlarging; bilinear enlarging is the
same either way. It is on by default because classifiers are trained and evaluated on PIL-resized
images; set antialias=False to reproduce DiffPure's or DensePure's resizing exactly.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdepureError, first_line
from ..loaders import load_checkpoint, load_state_dict_strict, resolve_path
from .wideresnet import extract_state_dict, fill_num_batches_tracked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")

# Adapter settings that reproduce each paper's resize + normalisation for its classifier.
PAPER_INPUTS = {
    "carlini-beit-512": dict(size=512, interpolation="bicubic", antialias=True, mean=(0.5,) * 3, std=(0.5,) * 3),
    "densepure-beit-512": dict(size=512, interpolation="bicubic", antialias=False, mean=(0.5,) * 3, std=(0.5,) * 3),
    "diffpure-imagenet-224": dict(size=224, interpolation="bilinear", antialias=False,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def _pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise SdepureError(f"input size must be an int or (height, width), got {size}")
    return size


class InputAdapter(nn.Module):
    """classifier(normalise(resize(x))) for [0, 1] images x of shape (N, C, H, W).

    size: the classifier's (H, W) or an int, None to leave the size alone (images already right);
    interpolation: 'bilinear' or 'bicubic' (also 'nearest', 'area'); align_corners=False throughout;
    antialias: PIL-equivalent resizing (low-pass when shrinking, PIL's bicubic kernel);
    mean, std: per-channel normalisation after resizing, None for none;
    clamp: clip to [0, 1] after resizing (bicubic overshoots slightly; the papers do not clip).
    Everything is differentiable, so attacks see through the adapter."""

    def __init__(self, classifier: nn.Module, size=None, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD, interpolation: str = "bilinear",
                 antialias: bool = True, clamp: bool = False):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise SdepureError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if (mean is None) != (std is None):
            raise SdepureError("give both mean and std, or neither")
        self.classifier = classifier
        self.size = _pair(size)
        self.interpolation = interpolation
        # torch allows antialias only for bilinear/bicubic
        self.antialias = bool(antialias) and interpolation in ("bilinear", "bicubic")
        self.clamp = clamp
        if mean is not None:
            mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            if mean_t.shape != std_t.shape or mean_t.ndim != 1 or (std_t <= 0).any():
                raise SdepureError(f"mean/std must be equal-length lists with std > 0, got {mean} / {std}")
            # non-persistent: not part of the classifier's weights file
            self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise SdepureError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            kw = {} if self.interpolation in ("nearest", "area") else {"align_corners": False}
            x = F.interpolate(x, size=self.size, mode=self.interpolation, antialias=self.antialias, **kw)
        if self.clamp:
            x = x.clamp(0, 1)
        if self.mean is not None:
            if x.shape[1] != self.mean.shape[1]:
                raise SdepureError(f"images have {x.shape[1]} channels, normalisation has {self.mean.shape[1]}")
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def forward(self, x):
        return self.classifier(self.preprocess(x))

    def extra_repr(self):
        norm = ("none" if self.mean is None
                else f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}")
        return (f"size={self.size}, interpolation={self.interpolation}, antialias={self.antialias}, "
                f"clamp={self.clamp}, {norm}")



def _import_optional(module: str):
    name = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SdepureError(f"{name} is not installed ({first_line(e)}); install it with `pip install {name}` "
                           f"in a version built for torch {torch.__version__.split('+')[0]}") from None
    except Exception as e:  # e.g. a torchvision built for another torch fails on its C++ ops
        raise SdepureError(f"{name} is installed but cannot be imported ({first_line(e)}); "
                           f"reinstall a version built for torch {torch.__version__.split('+')[0]}") from None


def _read_weights(path, allow_pickle: bool):
    """torch files through loaders.load_checkpoint (weights_only unless allowed); .safetensors
    through the safetensors package, which never executes code."""
    p = resolve_path(str(path))
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise SdepureError(f"weights file not found: {p}")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SdepureError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(p), device="cpu")
        except Exception as e:
            raise SdepureError(f"cannot read weights file {p}: {first_line(e)}") from None
    return load_checkpoint(p, allow_pickle)


def _load_into(model: nn.Module, path, family: str, allow_pickle: bool, wrappers) -> None:
    own = model.state_dict().keys()
    state = extract_state_dict(_read_weights(path, allow_pickle), own, wrappers=wrappers,
                               what=str(resolve_path(str(path))))
    # derived constants that a library version keeps out of its state dict (e.g. timm BEiT's
    # relative_position_index) but older checkpoints still carry: not weights, so drop them
    derived = {n for n, _ in model.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in derived}
    load_state_dict_strict(model, fill_num_batches_tracked(model, state), family)


def _model_cfg(model: nn.Module) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


def load_timm_classifier(name: str, weights, num_classes: int | None = None, input_size="auto",
                         interpolation: str | None = None, antialias: bool = True, mean=None, std=None,
                         allow_pickle: bool = False, **model_kwargs) -> InputAdapter:
    """timm.create_model(name, pretrained=False, ...) filled strictly from `weights`.

    A training checkpoint is unwrapped as timm's own load_checkpoint does (first of
    'state_dict_ema', 'model_ema', 'state_dict', 'model') and 'module.'/'model.' prefixes stripped.
    The model's pretrained_cfg (or default_cfg in older timm) supplies mean/std (ImageNet's when
    absent) and, with input_size='auto', the size to resize to and its interpolation;
    input_size=None leaves images unresized. Explicit arguments win.
    Checkpoints from a model's original repository may need timm's key remapping first
    (timm applies its checkpoint_filter_fn only when it downloads pretrained weights)."""
    timm = _import_optional("timm")
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    except Exception as e:  # unknown name (RuntimeError in timm), bad kwargs
        raise SdepureError(f"timm cannot build {name!r}: {first_line(e)}") from None
    _load_into(model, weights, f"timm:{name}", allow_pickle,
               ("state_dict_ema", "model_ema", "state_dict", "model"))
    cfg = _model_cfg(model)
    if input_size == "auto":
        input_size = tuple(cfg["input_size"][-2:]) if "input_size" in cfg else None
    if interpolation is None:
        interpolation = cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
    if mean is None and std is None:
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return InputAdapter(model.eval(), input_size, mean, std, interpolation, antialias).eval()


def load_torchvision_classifier(name: str, weights, num_classes: int | None = None, input_size=None,
                                interpolation: str = "bilinear", antialias: bool = True,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD, allow_pickle: bool = False,
                                **model_kwargs) -> InputAdapter:
    """torchvision.models.get_model(name, weights=None, ...) filled strictly from `weights`
    (e.g. a saved resnet50 state dict). torchvision's ImageNet classifiers all expect ImageNet
    mean/std after ToTensor; their usual evaluation size is 224 (pass input_size=224 to resize)."""
    tv = _import_optional("torchvision.models")
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    try:
        model = tv.get_model(name, weights=None, **model_kwargs)
    except Exception as e:  # unknown name (ValueError), bad kwargs
        raise SdepureError(f"torchvision cannot build {name!r}: {first_line(e)}") from None
    _load_into(model, weights, f"torchvision:{name}", allow_pickle, ("state_dict", "model"))
    return InputAdapter(model.eval(), input_size, mean, std, interpolation, antialias).eval()


__all__ = ["InputAdapter", "IMAGENET_MEAN", "IMAGENET_STD", "PAPER_INPUTS",
           "load_timm_classifier", "load_torchvision_classifier"]
