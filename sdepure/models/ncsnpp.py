"""score_sde's NCSN++ / DDPM++ network (Song et al. 2021), written for sdepure, loading the
published checkpoints of yang-song/score_sde_pytorch (used by NVlabs/DiffPure for CIFAR-10).

Checkpoint layout (score_sde utils.save_checkpoint, torch.save of a dict):
    {"model": state dict of nn.DataParallel(NCSNpp)  -> keys "module.all_modules.<i>.<...>"
                                                       and the buffer "module.sigmas",
     "ema": {"decay": float, "num_updates": int, "shadow_params": [tensor, ...]},
     "optimizer": torch.optim.Adam state dict, "step": int}
All submodules live in one flat ModuleList `all_modules`; its order is the construction order
below, and `shadow_params` follows [p for p in model.parameters() if p.requires_grad].
score_sde evaluates (and DiffPure purifies) with the EMA weights, so load_score_sde copies
shadow_params into the network after the strict state-dict load.

Calling convention (score_sde models/utils.get_score_fn, continuous VPSDE; DiffPure
runners/diffpure_sde.py RevVPSDE with score_type "score_sde"):
    labels = 999 * t,  score = -net(x, labels) / sqrt(1 - alpha_bar(t)),
with alpha_bar of the linear VP schedule beta_min 0.1, beta_max 20, i.e. the output is eps.
So wrap it as EpsNetModel(net, LinearVP(0.1, 20.0), time_input="999t").
Inputs: both presets have data.centered = True, so x is in [-1, 1] as given. (With
centered=False the network itself maps x in [0, 1] to 2x - 1, as score_sde does.)

Presets (configs/vp/cifar10_ddpmpp[_deep]_continuous.py over configs/default_cifar10_configs.py;
DiffPure's configs/cifar10.yml repeats the deep one):
    name "ncsnpp" (the DDPM++ flags), image_size 32, num_channels 3, centered True,
    nf 128, ch_mult (1, 2, 2, 2), num_res_blocks 8 (deep) or 4, attn_resolutions (16,),
    dropout 0.1, resamp_with_conv True, conditional True, fir False, fir_kernel [1, 3, 3, 1],
    skip_rescale True, resblock_type "biggan", progressive "none", progressive_input "none",
    progressive_combine "sum", attention_type "ddpm", init_scale 0, embedding_type "positional",
    fourier_scale 16, nonlinearity "swish", normalization "GroupNorm", scale_by_sigma False,
    sigma_min 0.01, sigma_max 50, num_scales 1000, beta_min 0.1, beta_max 20, ema_rate 0.9999,
    training.continuous True, sde "vpsde".
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdepureError
from ..loaders import load_checkpoint, load_state_dict_strict

FAMILY = "score_sde-ncsnpp"

_ACTS = {"swish": F.silu, "elu": F.elu, "relu": F.relu, "lrelu": lambda x: F.leaky_relu(x, 0.2)}

_COMMON = dict(
    image_size=32, num_channels=3, centered=True, nf=128, ch_mult=(1, 2, 2, 2),
    attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True, conditional=True,
    fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan", progressive="none",
    progressive_combine="sum", init_scale=0.0, embedding_type="positional", fourier_scale=16.0,
    nonlinearity="swish", scale_by_sigma=False, sigma_min=0.01, sigma_max=50.0, num_scales=1000,
)

# score_sde configs/vp/cifar10_*_continuous.py; the DDPM++ ones are what DiffPure uses
PRESETS = {
    "ddpmpp-deep-continuous": dict(_COMMON, num_res_blocks=8, fir=False, progressive_input="none"),
    "ddpmpp-continuous": dict(_COMMON, num_res_blocks=4, fir=False, progressive_input="none"),
    "ncsnpp-deep-continuous": dict(_COMMON, num_res_blocks=8, fir=True, progressive_input="residual"),
    "ncsnpp-continuous": dict(_COMMON, num_res_blocks=4, fir=True, progressive_input="residual"),
}


def ncsnpp_config(name: str) -> dict:
    """Constructor kwargs of NCSNpp for a published score_sde VP CIFAR-10 model."""
    if name not in PRESETS:
        raise SdepureError(f"unknown NCSN++ preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ---------------------------------------------------------------- init and resampling helpers

def _fan_avg_uniform_(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's variance-scaling init (fan_avg, uniform); scale 0 means 1e-10 as in score_sde, so a
    fresh network's output convolutions start at (almost) zero."""
    scale = 1e-10 if scale == 0 else scale
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    fan_avg = (w.shape[0] + w.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        return w.uniform_(-bound, bound)


def _conv(in_ch, out_ch, k=3, stride=1, padding=None, init_scale=1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2 if padding is None else padding)
    _fan_avg_uniform_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_dim, out_dim) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    _fan_avg_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(ch // 4, 32), ch, eps=1e-6)


def _fir_kernel(taps) -> torch.Tensor:
    k = torch.tensor(taps, dtype=torch.float64)
    if k.dim() == 1:
        k = torch.outer(k, k)
    return (k / k.sum()).to(torch.float32)


def _upfirdn(x: torch.Tensor, k: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Zero-insertion upsampling by `up`, zero padding (before, after) on both axes, 2-D FIR
    filtering with k (a true convolution, hence the flip), then keeping every `down`-th pixel."""
    n, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(n, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(k, [0, 1]).to(x)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, stride=down, groups=c)


def _fir_up(x, k):
    p = k.shape[0] - 2
    return _upfirdn(x, k * 4, up=2, pad=((p + 1) // 2 + 1, p // 2))


def _fir_down(x, k):
    p = k.shape[0] - 2
    return _upfirdn(x, k, down=2, pad=((p + 1) // 2, p // 2))


def _nearest_up(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _mean_down(x):
    return F.avg_pool2d(x, 2)


# ---------------------------------------------------------------- building blocks
# Attribute names (GroupNorm_0, Conv_0, Dense_0, NIN_0, W, b, ...) and their registration
# order are those of the checkpoints: the order fixes model.parameters(), hence the EMA list.

class _NIN(nn.Module):
    """Per-pixel linear map with weight W of shape (in, out)."""

    def __init__(self, in_dim, out_dim, init_scale=0.1):
        super().__init__()
        self.W = nn.Parameter(_fan_avg_uniform_(torch.empty(in_dim, out_dim), init_scale))
        self.b = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x):
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[:, None, None]


class _FourierFeatures(nn.Module):
    """Fixed random Fourier features of log(sigma) (NCSN++ VE); W is not trained, so it is not
    in the EMA list."""

    def __init__(self, size, scale):
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, s):
        arg = 2 * math.pi * s[:, None] * self.W[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class _FirConv(nn.Module):
    """3x3 convolution fused with FIR downsampling (score_sde's up_or_down_sampling.Conv2d with
    down=True): filter, then a stride-2 convolution without padding."""

    def __init__(self, in_ch, out_ch, fir_kernel, kernel=3):
        super().__init__()
        self.weight = nn.Parameter(_fan_avg_uniform_(torch.empty(out_ch, in_ch, kernel, kernel)))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("fir", _fir_kernel(fir_kernel), persistent=False)

    def forward(self, x):
        p = self.fir.shape[0] - 2 + self.weight.shape[-1] - 1
        x = _upfirdn(x, self.fir, pad=((p + 1) // 2, p // 2))
        return F.conv2d(x, self.weight, stride=2) + self.bias[None, :, None, None]


class _Attention(nn.Module):
    """Single-head self-attention over pixels (DDPM's block) with NIN projections."""

    def __init__(self, ch, skip_rescale, init_scale):
        super().__init__()
        self.GroupNorm_0 = _group_norm(ch)
        self.NIN_0 = _NIN(ch, ch)
        self.NIN_1 = _NIN(ch, ch)
        self.NIN_2 = _NIN(ch, ch)
        self.NIN_3 = _NIN(ch, ch, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.GroupNorm_0(x)
        q, k, v = (m(y).reshape(b, c, h * w) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
        att = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) * c ** -0.5, dim=-1)
        y = self.NIN_3(torch.einsum("bnm,bcm->bcn", att, v).reshape(b, c, h, w))
        return (x + y) / math.sqrt(2.0) if self.skip_rescale else x + y


class _ResBlock(nn.Module):
    """'biggan' (resampling inside the block, 1x1 conv shortcut Conv_2) or 'ddpm' (no
    resampling, NIN_0 shortcut) residual block with an additive time-embedding bias."""

    def __init__(self, kind, in_ch, out_ch, temb_dim, act, dropout, skip_rescale, init_scale,
                 up=False, down=False, fir=False, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch)
        self.Dense_0 = _linear(temb_dim, out_ch)  # present even when unconditional, as published
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, init_scale=init_scale)
        self.shortcut = None  # a name, not the module, so it is registered only once
        if kind == "biggan" and (in_ch != out_ch or up or down):
            self.Conv_2 = _conv(in_ch, out_ch, k=1)
            self.shortcut = "Conv_2"
        elif kind == "ddpm" and in_ch != out_ch:
            self.NIN_0 = _NIN(in_ch, out_ch)
            self.shortcut = "NIN_0"
        self.act = act
        self.skip_rescale = skip_rescale
        self.resample = None
        if up:
            self.resample = (lambda x, k=_fir_kernel(fir_kernel): _fir_up(x, k)) if fir else _nearest_up
        elif down:
            self.resample = (lambda x, k=_fir_kernel(fir_kernel): _fir_down(x, k)) if fir else _mean_down

    def forward(self, x, temb=None):
        h = self.act(self.GroupNorm_0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.shortcut is not None:
            x = getattr(self, self.shortcut)(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class _Resample(nn.Module):
    """Stand-alone 2x up- or downsampling ('ddpm' blocks and the residual input/output pyramids)."""

    def __init__(self, up, in_ch, out_ch=None, with_conv=False, fir=False, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        self.up, self.with_conv, self.fir = up, with_conv, fir
        self.k = _fir_kernel(fir_kernel)
        if with_conv and not fir:
            # downsampling pads right/bottom by one, then a 3x3 stride-2 conv without padding
            self.Conv_0 = _conv(in_ch, out_ch) if up else _conv(in_ch, out_ch, stride=2, padding=0)
        elif with_conv and fir:
            if up:
                raise SdepureError(f"{FAMILY}: FIR upsampling with a convolution is not supported "
                                   "(no published score_sde configuration uses it)")
            self.Conv2d_0 = _FirConv(in_ch, out_ch, fir_kernel)

    def forward(self, x):
        if self.up:
            if self.fir:
                return _fir_up(x, self.k.to(x))
            x = _nearest_up(x)
            return self.Conv_0(x) if self.with_conv else x
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else _fir_down(x, self.k.to(x))
        return self.Conv_0(F.pad(x, (0, 1, 0, 1))) if self.with_conv else _mean_down(x)


class _Combine(nn.Module):
    """Merges the downsampled input pyramid into the features: 1x1 conv, then sum or concat."""

    def __init__(self, in_ch, out_ch, method):
        super().__init__()
        self.Conv_0 = _conv(in_ch, out_ch, k=1)
        self.method = method

    def forward(self, pyramid, h):
        p = self.Conv_0(pyramid)
        return p + h if self.method == "sum" else torch.cat([p, h], dim=1)


def positional_embedding(labels: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal embedding as score_sde computes it: [sin, cos] of labels * f_i with
    f_i = max_positions^(-i / (dim/2 - 1)), in float32, zero-padded to odd dim."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=labels.device)
                      * -(math.log(max_positions) / (half - 1)))
    arg = labels.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# ---------------------------------------------------------------- the network

class NCSNpp(nn.Module):
    """score_sde's 'ncsnpp' model class (NCSN++ and, with the DDPM++ flags, DDPM++).

    forward(x, labels): x of shape (B, C, H, W) ([-1, 1] when centered); labels of shape (B,):
    the positional-embedding input (999 t for continuous VP) or, with embedding_type 'fourier',
    the noise level sigma. Returns a (B, C, H, W) tensor (eps for VP models; divided by sigma
    when scale_by_sigma).
    """

    def __init__(self, *, image_size=32, num_channels=3, centered=True, nf=128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=8, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
                 conditional=True, fir=False, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
                 resblock_type="biggan", progressive="none", progressive_input="none",
                 progressive_combine="sum", init_scale=0.0, embedding_type="positional",
                 fourier_scale=16.0, nonlinearity="swish", scale_by_sigma=False,
                 sigma_min=0.01, sigma_max=50.0, num_scales=1000):
        super().__init__()
        resblock_type, progressive = resblock_type.lower(), progressive.lower()
        progressive_input, embedding_type = progressive_input.lower(), embedding_type.lower()
        progressive_combine = progressive_combine.lower()
        choices = {"resblock_type": (resblock_type, ("biggan", "ddpm")),
                   "progressive": (progressive, ("none", "output_skip", "residual")),
                   "progressive_input": (progressive_input, ("none", "input_skip", "residual")),
                   "progressive_combine": (progressive_combine, ("sum", "cat")),
                   "embedding_type": (embedding_type, ("positional", "fourier")),
                   "nonlinearity": (nonlinearity, tuple(_ACTS))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise SdepureError(f"{FAMILY}: {key} {value!r} not one of {', '.join(allowed)}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise SdepureError(f"{FAMILY}: image_size {image_size} not divisible by 2^{len(ch_mult) - 1}")
        self.config = dict(
            image_size=image_size, num_channels=num_channels, centered=centered, nf=nf,
            ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
            dropout=dropout, resamp_with_conv=resamp_with_conv, conditional=conditional, fir=fir,
            fir_kernel=tuple(fir_kernel), skip_rescale=skip_rescale, resblock_type=resblock_type,
            progressive=progressive, progressive_input=progressive_input,
            progressive_combine=progressive_combine, init_scale=init_scale, embedding_type=embedding_type,
            fourier_scale=fourier_scale, nonlinearity=nonlinearity, scale_by_sigma=scale_by_sigma,
            sigma_min=sigma_min, sigma_max=sigma_max, num_scales=num_scales)
        self.act = _ACTS[nonlinearity]
        self.nf = nf
        self.centered = centered
        self.scale_by_sigma = scale_by_sigma
        self.embedding_type = embedding_type
        self.conditional = conditional
        self.skip_rescale = skip_rescale
        self.progressive = progressive
        self.progressive_input = progressive_input
        # SMLD noise levels, float64 as published; only read when scale_by_sigma with positional labels
        self.register_buffer("sigmas", torch.tensor(
            np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))))
        self._fir_k = _fir_kernel(fir_kernel)
        self._fir = fir

        modules: list[nn.Module] = []

        def add(m: nn.Module) -> int:
            modules.append(m)
            return len(modules) - 1

        temb_dim = 4 * nf
        self._i_fourier = add(_FourierFeatures(nf, fourier_scale)) if embedding_type == "fourier" else None
        embed_dim = 2 * nf if embedding_type == "fourier" else nf
        self._i_temb = (add(_linear(embed_dim, temb_dim)), add(_linear(temb_dim, temb_dim))) if conditional else None

        def res(in_ch, out_ch=None, up=False, down=False):
            return _ResBlock(resblock_type, in_ch, out_ch or in_ch, temb_dim, self.act, dropout,
                             skip_rescale, init_scale, up=up, down=down, fir=fir, fir_kernel=fir_kernel)

        def attn(ch):
            return _Attention(ch, skip_rescale, init_scale)

        channels = num_channels
        resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
        self._i_in = add(_conv(channels, nf))
        skip_ch = [nf]
        in_ch, pyramid_ch = nf, channels

        # down path: per level a list of (res, attn or None), then (downsample, pyramid module)
        self._down = []
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                r = add(res(in_ch, nf * mult))
                in_ch = nf * mult
                a = add(attn(in_ch)) if resolutions[level] in attn_resolutions else None
                blocks.append((r, a))
                skip_ch.append(in_ch)
            down = pyr = None
            if level != len(ch_mult) - 1:
                down = add(_Resample(False, in_ch, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
                           if resblock_type == "ddpm" else res(in_ch, down=True))
                if progressive_input == "input_skip":
                    pyr = add(_Combine(pyramid_ch, in_ch, progressive_combine))
                    if progressive_combine == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    pyr = add(_Resample(False, pyramid_ch, in_ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                    pyramid_ch = in_ch
                skip_ch.append(in_ch)
            self._down.append((blocks, down, pyr))

        self._mid = (add(res(in_ch)), add(attn(in_ch)), add(res(in_ch)))

        # up path: per level the res blocks, attn or None, pyramid modules, upsample or None
        self._up = []
        pyramid_ch = 0
        for level in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(add(res(in_ch + skip_ch.pop(), nf * ch_mult[level])))
                in_ch = nf * ch_mult[level]
            a = add(attn(in_ch)) if resolutions[level] in attn_resolutions else None
            pyr = ()
            if progressive == "output_skip":
                pyr = (add(_group_norm(in_ch)), add(_conv(in_ch, channels, init_scale=init_scale)))
                pyramid_ch = channels
            elif progressive == "residual":
                if level == len(ch_mult) - 1:
                    pyr = (add(_group_norm(in_ch)), add(_conv(in_ch, in_ch)))
                else:
                    pyr = (add(_Resample(True, pyramid_ch, in_ch, with_conv=True, fir=fir, fir_kernel=fir_kernel)),)
                pyramid_ch = in_ch
            up = None
            if level != 0:
                up = add(_Resample(True, in_ch, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
                         if resblock_type == "ddpm" else res(in_ch, up=True))
            self._up.append((level, blocks, a, pyr, up))
        assert not skip_ch

        self._i_out = None
        if progressive != "output_skip":
            self._i_out = (add(_group_norm(in_ch)), add(_conv(in_ch, channels, init_scale=init_scale)))
        self._last_level = len(ch_mult) - 1
        self.all_modules = nn.ModuleList(modules)

    def _pyramid_resample(self, x, up):
        k = self._fir_k.to(x)
        if up:
            return _fir_up(x, k) if self._fir else _nearest_up(x)
        return _fir_down(x, k) if self._fir else _mean_down(x)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = self.all_modules
        labels = torch.as_tensor(labels, device=x.device).reshape(-1).expand(x.shape[0])
        if self.embedding_type == "fourier":
            temb = m[self._i_fourier](torch.log(labels))
        else:
            temb = positional_embedding(labels, self.nf)
        if self._i_temb is not None:
            i0, i1 = self._i_temb
            temb = temb.to(m[i0].weight.dtype)
            temb = m[i1](self.act(m[i0](temb)))
        else:
            temb = None

        if not self.centered:
            x = 2 * x - 1.0

        pyramid = x if self.progressive_input != "none" else None
        hs = [m[self._i_in](x)]
        for blocks, down, pyr in self._down:
            for r, a in blocks:
                h = m[r](hs[-1], temb)
                hs.append(m[a](h) if a is not None else h)
            if down is None:
                continue
            h = m[down](hs[-1]) if isinstance(m[down], _Resample) else m[down](hs[-1], temb)
            if self.progressive_input == "input_skip":
                pyramid = self._pyramid_resample(pyramid, up=False)
                h = m[pyr](pyramid, h)
            elif self.progressive_input == "residual":
                pyramid = m[pyr](pyramid) + h
                if self.skip_rescale:
                    pyramid = pyramid / math.sqrt(2.0)
                h = pyramid
            hs.append(h)

        r0, a, r1 = self._mid
        h = m[r1](m[a](m[r0](hs[-1], temb)), temb)

        pyramid = None
        for level, blocks, a, pyr, up in self._up:
            for r in blocks:
                h = m[r](torch.cat([h, hs.pop()], dim=1), temb)
            if a is not None:
                h = m[a](h)
            if self.progressive == "output_skip":
                out = m[pyr[1]](self.act(m[pyr[0]](h)))
                pyramid = out if level == self._last_level else self._pyramid_resample(pyramid, up=True) + out
            elif self.progressive == "residual":
                if level == self._last_level:
                    pyramid = m[pyr[1]](self.act(m[pyr[0]](h)))
                else:
                    pyramid = m[pyr[0]](pyramid) + h
                    if self.skip_rescale:
                        pyramid = pyramid / math.sqrt(2.0)
                    h = pyramid
            if up is not None:
                h = m[up](h) if isinstance(m[up], _Resample) else m[up](h, temb)
        assert not hs

        if self._i_out is not None:
            h = m[self._i_out[1]](self.act(m[self._i_out[0]](h)))
        else:
            h = pyramid
        if self.scale_by_sigma:
            sig = labels if self.embedding_type == "fourier" else self.sigmas[labels.long()]
            h = h / sig.to(h.dtype).reshape(-1, *([1] * (h.dim() - 1)))
        return h


# ---------------------------------------------------------------- loading

def load_score_sde(path, preset: str | dict, allow_pickle: bool = False) -> NCSNpp:
    """Build NCSNpp for `preset` (a name from PRESETS or a dict of constructor kwargs), load the
    'model' state dict of a score_sde checkpoint strictly (after removing DataParallel's
    'module.' prefix), then copy the EMA 'shadow_params' into the trainable parameters in
    model.parameters() order, as score_sde's evaluation and DiffPure do. Returns the net in eval
    mode."""
    kwargs = ncsnpp_config(preset) if isinstance(preset, str) else dict(preset)
    family = f"{FAMILY} ({preset})" if isinstance(preset, str) else FAMILY
    try:
        net = NCSNpp(**kwargs)
    except TypeError as e:
        raise SdepureError(f"{family}: bad architecture settings: {e}") from None

    ckpt = load_checkpoint(path, allow_pickle)
    if not isinstance(ckpt, dict) or not {"model", "ema"} <= set(ckpt):
        got = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SdepureError(f"{path} is not a score_sde checkpoint (a dict with 'model' and 'ema' "
                           f"expected for family {family}; got {got})")
    state = ckpt["model"]
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    load_state_dict_strict(net, state, family)

    ema = ckpt["ema"]
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)):
        raise SdepureError(f"{path}: 'ema' has no 'shadow_params' list (family {family})")
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    if len(shadow) != len(named):
        raise SdepureError(f"{path}: EMA has {len(shadow)} shadow params, family {family} has "
                           f"{len(named)} trainable parameters")
    for i, ((name, p), s) in enumerate(zip(named, shadow)):
        if not torch.is_tensor(s) or tuple(s.shape) != tuple(p.shape):
            shape = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
            raise SdepureError(f"{path}: EMA shadow param {i} has shape {shape}, expected "
                               f"{tuple(p.shape)} for {name} (family {family})")
    with torch.no_grad():
        for (_, p), s in zip(named, shadow):
            p.copy_(s)
    return net.eval()


__all__ = ["NCSNpp", "PRESETS", "ncsnpp_config", "load_score_sde", "positional_embedding"]
