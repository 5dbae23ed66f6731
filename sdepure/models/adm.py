"""The ADM UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", openai/guided-diffusion)
and of Nichol & Dhariwal 2021 ("Improved DDPM", openai/improved-diffusion), written for sdepure.

Only the parameter names and shapes follow the published checkpoints, so that their flat fp32
state dicts load with load_state_dict(strict=True):

    time_embed.{0,2}                  Linear(C, 4C), Linear(4C, 4C)  (1 is SiLU)
    input_blocks.0.0                  Conv2d(in, C, 3)
    input_blocks.N.0                  ResBlock      .in_layers.{0,2} .emb_layers.1 .out_layers.{0,3}
                                                    [.skip_connection when the width changes]
    input_blocks.N.1                  AttentionBlock .norm .qkv (Conv1d c->3c) .proj_out (Conv1d)
    input_blocks.N.0                  at a level change: Downsample .op (strided Conv2d), or a
                                      parameter-free-resampling ResBlock (resblock_updown)
    middle_block.{0,1,2}              ResBlock, AttentionBlock, ResBlock
    output_blocks.N.{0,1,2}           ResBlock on [h, skip], optional attention, then Upsample .conv
                                      or an up-ResBlock at the end of each level but the first
    out.{0,2}                         GroupNorm(32, C), Conv2d(C, out, 3)  (1 is SiLU)

Both repositories share this layout; what differs is which options exist (checked against
guided_diffusion/unet.py + script_util.py and improved_diffusion/unet.py + script_util.py):
  * guided-diffusion adds resblock_updown (up/down by a ResBlock with nearest-neighbour /
    2x2-average resampling inside, instead of Upsample.conv / Downsample.op), num_head_channels
    (heads = width // num_head_channels), use_new_attention_order and fractional channel_mult.
  * improved-diffusion has only num_heads and conv resampling. Its attention has the same keys
    (norm, qkv, proj_out) and the same q/k/v layout as guided-diffusion's default "legacy" order:
    the 3c qkv channels are split into heads first, then each head's 3d channels into q, k, v.
    (Its last conv takes model_channels inputs where guided's takes channel_mult[0] * model_channels;
    the same when channel_mult[0] = 1, as in every improved-diffusion configuration.)
  * use_scale_shift_norm defaults to True in improved-diffusion's training script (the CIFAR-10
    checkpoint did not override it) and is set explicitly to True for guided 256x256 uncond.
Normalisation is GroupNorm with 32 groups computed in fp32; the timestep embedding is
[cos(t f_i), sin(t f_i)] with f_i = 10000^(-i / (C/2)), i = 0..C/2-1, of the raw time input.

Parameters get PyTorch's default initialisation (the repositories zero some output convolutions,
which only matters for training from scratch). Everything runs in the parameters' dtype (fp32);
guided-diffusion's use_fp16 (fp16 convolutions at sampling time) is not reproduced.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdepureError
from ..loaders import load_checkpoint, load_state_dict_strict
from ..schedules import schedule_from_config
from .base import TIME_INPUTS, EpsNetModel

NORM_GROUPS = 32  # fixed in both repositories


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in fp32 whatever the activation dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (B, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      * (-math.log(max_period) / half))
    angles = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class EmbedSequential(nn.Sequential):
    """nn.Sequential whose ResBlocks also receive the time embedding."""

    def forward(self, x, emb):  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv (key `op`) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution by nearest neighbour, then an optional 3x3 conv (key `conv`)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


def _up(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _down(x):
    return F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """norm-act-conv, time conditioning (FiLM scale/shift on the second norm, or an added bias),
    norm-act-dropout-conv, plus a skip (1x1 conv when the width changes).

    resample="up"/"down" (guided-diffusion's resblock_updown) resamples both the skip input and
    the main branch between the first activation and the first conv; it has no parameters.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float,
                 scale_shift: bool, resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(NORM_GROUPS, in_ch), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, (2 if scale_shift else 1) * out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(NORM_GROUPS, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self._resample = {None: None, "up": _up, "down": _down}[resample]

    def forward(self, x, emb):
        norm1, act1, conv1 = self.in_layers
        h = act1(norm1(x))
        if self._resample is not None:
            h, x = self._resample(h), self._resample(x)
        h = conv1(h)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm2, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + e)
        return self.skip_connection(x) + rest(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions, residual.

    legacy_order=True: the qkv channels are laid out head by head, [q_h | k_h | v_h] per head
    (improved-diffusion, and guided-diffusion unless use_new_attention_order); False: [Q | K | V],
    each split into heads.
    """

    def __init__(self, channels: int, heads: int, legacy_order: bool = True):
        super().__init__()
        if channels % heads:
            raise SdepureError(f"attention width {channels} is not divisible into {heads} heads")
        self.heads = heads
        self.legacy_order = legacy_order
        self.norm = GroupNorm32(NORM_GROUPS, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        n, d = flat.shape[-1], c // self.heads
        qkv = self.qkv(self.norm(flat))
        if self.legacy_order:
            q, k, v = qkv.reshape(b, self.heads, 3 * d, n).split(d, dim=2)
        else:
            q, k, v = (part.reshape(b, self.heads, d, n) for part in qkv.chunk(3, dim=1))
        # (b, heads, n, d); scale 1/sqrt(d) as in the repositories
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, n)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class ADMUNet(nn.Module):
    """The ADM UNet. forward(x, timesteps) -> (B, out_channels, H, W).

    x: images in [-1, 1]; timesteps: float tensor (B,) in the checkpoint's native convention
    (guided-diffusion: table index 0..T-1; improved-diffusion with rescale_timesteps: index*1000/T).
    With learned sigma, out_channels = 2 * in_channels and the first in_channels are eps.

    attention_resolutions are feature-map sizes (as the command-line flags give them), turned into
    downsampling factors image_size // r. variant="improved" only allows the options that
    improved-diffusion's UNet has (no resblock_updown, num_head_channels or new attention order).
    """

    def __init__(self, image_size: int, in_channels: int = 3, model_channels: int = 128,
                 out_channels: int = 3, num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16, 8), dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: int | None = None, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 variant: str = "guided"):
        super().__init__()
        if variant not in ("guided", "improved"):
            raise SdepureError(f"unknown ADM variant {variant!r}; choose guided or improved")
        if variant == "improved" and (resblock_updown or num_head_channels != -1 or use_new_attention_order):
            raise SdepureError("improved-diffusion's UNet has no resblock_updown, num_head_channels or "
                               "use_new_attention_order; use variant='guided'")
        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           out_channels=out_channels, num_res_blocks=num_res_blocks,
                           attention_resolutions=tuple(attention_resolutions), dropout=dropout,
                           channel_mult=tuple(channel_mult), conv_resample=conv_resample,
                           num_classes=num_classes, num_heads=num_heads, num_head_channels=num_head_channels,
                           num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
                           resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
                           variant=variant)
        self.model_channels = model_channels
        self.num_classes = num_classes
        attn_factors = {image_size // int(r) for r in attention_resolutions}
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_dim = 4 * model_channels

        def res(cin, cout, resample=None):
            return ResBlock(cin, cout, emb_dim, dropout, use_scale_shift_norm, resample)

        def attn(ch, heads):
            if num_head_channels != -1:
                if ch % num_head_channels:
                    raise SdepureError(f"width {ch} is not a multiple of num_head_channels {num_head_channels}")
                heads = ch // num_head_channels
            return AttentionBlock(ch, heads, legacy_order=not use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        # encoder: every block's output is kept for the decoder's skip concatenations
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_widths = [ch]
        factor = 1
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            width = int(mult * model_channels)
            for _ in range(num_res_blocks):
                layers = [res(ch, width)]
                ch = width
                if factor in attn_factors:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_widths.append(ch)
            if level != last:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                skip_widths.append(ch)
                factor *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        # decoder: num_res_blocks + 1 blocks per level, each eating one skip
        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            width = int(channel_mult[level] * model_channels)
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_widths.pop(), width)]
                ch = width
                if factor in attn_factors:
                    layers.append(attn(ch, heads_up))
                if level > 0 and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else Upsample(ch, conv_resample))
                    factor //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(NORM_GROUPS, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise SdepureError("pass class labels y exactly when the model is class-conditional")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        w = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(w.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(w.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


# Constructor kwargs at the published flags (README MODEL_FLAGS + script_util defaults).
ADM_PRESETS: dict[str, dict] = {
    # guided-diffusion 256x256_diffusion_uncond.pt: --attention_resolutions 32,16,8 --class_cond False
    # --image_size 256 --learn_sigma True --num_channels 256 --num_head_channels 64 --num_res_blocks 2
    # --resblock_updown True --use_scale_shift_norm True (--use_fp16 True only at run time);
    # defaults: dropout 0, num_heads 4 (overridden by num_head_channels), use_new_attention_order False,
    # channel_mult (1, 1, 2, 2, 4, 4) for 256 px.
    "guided-256-uncond": dict(
        variant="guided", image_size=256, in_channels=3, model_channels=256, out_channels=6,
        num_res_blocks=2, attention_resolutions=(32, 16, 8), dropout=0.0,
        channel_mult=(1, 1, 2, 2, 4, 4), conv_resample=True, num_classes=None, num_heads=4,
        num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False),
    # improved-diffusion cifar10_uncond_50M_500K.pt: --image_size 32 --num_channels 128
    # --num_res_blocks 3 --learn_sigma True --dropout 0.3; defaults: num_heads 4,
    # attention_resolutions 16,8, use_scale_shift_norm True, channel_mult (1, 2, 2, 2) for 32 px.
    "improved-cifar10-uncond": dict(
        variant="improved", image_size=32, in_channels=3, model_channels=128, out_channels=6,
        num_res_blocks=3, attention_resolutions=(16, 8), dropout=0.3,
        channel_mult=(1, 2, 2, 2), conv_resample=True, num_classes=None, num_heads=4,
        num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
        resblock_updown=False, use_new_attention_order=False),
}

# How each preset's diffusion feeds the network (for EpsNetModel): the schedule and time input the
# checkpoint was trained with. A config's [model] table may replace either (adm_eps_model), e.g.
# DiffPure solves the continuous VP SDE with the guided 256x256 network (diffpure-imagenet).
ADM_DIFFUSION: dict[str, dict] = {
    # --diffusion_steps 1000 --noise_schedule linear; rescale_timesteps False: raw index
    "guided-256-uncond": dict(schedule={"kind": "discrete-linear", "T": 1000}, time_input="index",
                              learned_sigma=True),
    # --diffusion_steps 4000 --noise_schedule cosine; rescale_timesteps True: index * 1000 / 4000
    "improved-cifar10-uncond": dict(schedule={"kind": "discrete-cosine", "T": 4000},
                                    time_input="index-rescaled", learned_sigma=True),
}

# Keys under which other tools nest a state dict; tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "ema", "model_state_dict")


def adm_config(name: str) -> dict:
    """Constructor kwargs of ADMUNet for a named published checkpoint."""
    if name not in ADM_PRESETS:
        raise SdepureError(f"unknown ADM preset {name!r}; known: {', '.join(ADM_PRESETS)}")
    return dict(ADM_PRESETS[name])


def _unwrap_state(ckpt, path) -> dict:
    """The published files are flat {name: tensor} dicts. A dict that instead holds one under
    'state_dict', 'model', 'ema' or 'model_state_dict' is unwrapped, and a 'module.' prefix on
    every key (torch DataParallel / DDP) is stripped."""
    if not isinstance(ckpt, dict):
        raise SdepureError(f"{path}: expected a state dict, got {type(ckpt).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if ckpt and all(isinstance(k, str) and k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


def load_adm(path, preset: str | dict, allow_pickle: bool = False) -> ADMUNet:
    """Build the preset's ADMUNet and load a published checkpoint strictly; returns it in eval mode
    (which turns dropout off). `preset` is a name from ADM_PRESETS or a dict of ADMUNet kwargs
    (for non-preset checkpoints). Weights stored in fp16 are cast to the fp32 parameters."""
    label = "custom" if isinstance(preset, dict) else preset
    kwargs = preset if isinstance(preset, dict) else adm_config(preset)
    # built on meta and left uninitialised: the strict load overwrites every tensor (ADM has no
    # buffers), and skipping the random init saves seconds at 550M parameters
    try:
        with torch.device("meta"):
            net = ADMUNet(**kwargs)
    except TypeError as e:
        raise SdepureError(f"bad ADMUNet settings: {e}") from None
    net = net.to_empty(device="cpu")
    state = _unwrap_state(load_checkpoint(path, allow_pickle), path)
    load_state_dict_strict(net, state, f"adm:{label}")
    return net.eval()


def adm_eps_model(net: ADMUNet, preset: str, t_min: float | None = None, schedule: dict | None = None,
                  time_input: str | None = None) -> EpsNetModel:
    """Wrap a loaded preset network in sdepure's DiffusionModel convention (continuous t in [0, 1]).
    `schedule` (a schedule table such as {"kind": "linear", "beta_min": 0.1, "beta_max": 20.0}) and
    `time_input` (a name in TIME_INPUTS) replace the preset's ADM_DIFFUSION entry when given."""
    if preset not in ADM_DIFFUSION:
        raise SdepureError(f"unknown ADM preset {preset!r}; known: {', '.join(ADM_DIFFUSION)}")
    info = ADM_DIFFUSION[preset]
    if schedule is None:
        schedule = info["schedule"]
    elif not isinstance(schedule, dict):
        raise SdepureError("model.schedule must be a table such as {kind = \"linear\", beta_min = 0.1, "
                           "beta_max = 20.0}")
    if time_input is None:
        time_input = info["time_input"]
    elif not isinstance(time_input, str):
        raise SdepureError(f"model.time_input must be a name: one of {', '.join(TIME_INPUTS)}")
    model = EpsNetModel(net, schedule_from_config(schedule), time_input=time_input,
                        learned_sigma=info["learned_sigma"], t_min=t_min).eval()
    # a table-index time input on a continuous schedule would only fail at the first network call
    try:
        TIME_INPUTS[time_input](torch.full((1,), 0.5), model.schedule)
    except SdepureError as e:
        raise SdepureError(f"time input {time_input!r} with schedule {model.schedule.describe()}: {e}") from None
    return model


__all__ = ["ADMUNet", "ADM_PRESETS", "ADM_DIFFUSION", "adm_config", "load_adm", "adm_eps_model",
           "timestep_embedding"]
