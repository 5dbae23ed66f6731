"""Noise schedules of the VP diffusion on t in [0, 1].

Every schedule answers alpha_bar(t), beta(t) = -d/dt log alpha_bar(t), the inverse
t_of_alpha_bar, and t_star(sigma): the time whose noise level matches Gaussian smoothing
noise sigma on [0, 1] images (2 sigma on the model's [-1, 1] scale), i.e.
(1 - alpha_bar) / alpha_bar = (2 sigma)^2.

Discrete tables of T values (DDPM / guided- and improved-diffusion) are placed at
t_i = (i + 1) / T for table index i = 0..T-1, with alpha_bar(0) = 1, and log alpha_bar is
interpolated linearly in between, so beta(t) is piecewise constant.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import SdepureError

T_RULES = ("nearest", "first")


def alpha_bar_for_sigma(sigma: float) -> float:
    """alpha_bar whose noise-to-signal ratio equals (2 sigma)^2."""
    if not sigma > 0:
        raise SdepureError(f"sigma must be > 0, got {sigma}")
    return 1.0 / (1.0 + 4.0 * sigma * sigma)


def sigma_for_alpha_bar(alpha_bar: float) -> float:
    """Smoothing sigma on [0, 1] images equivalent to diffusing to alpha_bar."""
    return 0.5 * math.sqrt((1.0 - alpha_bar) / alpha_bar)


def _as_tensor(t) -> torch.Tensor:
    return t if torch.is_tensor(t) else torch.as_tensor(t, dtype=torch.float64)


class VPSchedule:
    """Base class; subclasses define log_alpha_bar, beta and t_of_alpha_bar."""

    def log_alpha_bar(self, t):
        raise NotImplementedError

    def beta(self, t):
        raise NotImplementedError

    def t_of_alpha_bar(self, alpha_bar):
        raise NotImplementedError

    def alpha_bar(self, t):
        return torch.exp(self.log_alpha_bar(t))

    def t_star(self, sigma: float, rule: str | None = None) -> float:
        """Exact t with alpha_bar(t) = 1 / (1 + 4 sigma^2); `rule` only applies to tables."""
        if rule is not None:
            raise SdepureError(f"t* rule {rule!r} only applies to discrete schedules")
        return float(self.t_of_alpha_bar(torch.tensor(alpha_bar_for_sigma(sigma), dtype=torch.float64)))

    def describe(self) -> dict:
        raise NotImplementedError


class LinearVP(VPSchedule):
    """score_sde / DiffPure continuous VP: beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 < beta_min <= beta_max):
            raise SdepureError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def log_alpha_bar(self, t):
        t = _as_tensor(t)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def beta(self, t):
        t = _as_tensor(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def t_of_alpha_bar(self, alpha_bar):
        integral = -torch.log(_as_tensor(alpha_bar))
        a = 0.5 * (self.beta_max - self.beta_min)
        if a == 0:
            return integral / self.beta_min
        # root of a t^2 + beta_min t - integral = 0, written to avoid cancellation
        return 2 * integral / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 4 * a * integral))

    def describe(self) -> dict:
        return {"kind": "linear", "beta_min": self.beta_min, "beta_max": self.beta_max}


class DiscreteVP(VPSchedule):
    """A table alpha_bar[i], i = 0..T-1, placed at t = (i + 1) / T."""

    def __init__(self, alpha_bars, kind: str = "table"):
        ab = np.asarray(alpha_bars, dtype=np.float64)
        if ab.ndim != 1 or len(ab) < 1:
            raise SdepureError("alpha_bar table must be a non-empty 1-D array")
        if not (np.all(ab > 0) and np.all(ab < 1) and np.all(np.diff(ab) < 0)):
            raise SdepureError("alpha_bar table must be strictly decreasing inside (0, 1)")
        self.kind = kind
        self.T = len(ab)
        self.alpha_bars = torch.from_numpy(ab)
        # knots at t = 0, 1/T, ..., 1 with alpha_bar(0) = 1
        self._knots_t = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        self._knots_log = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alpha_bars)])
        self._slopes = -torch.diff(self._knots_log) * self.T  # beta on each segment
        self._on_device = {}  # device -> tables: copied once, not at every network call (a host sync on CUDA)

    def _tables(self, device):
        """(knots_t, knots_log, slopes) on `device`."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._knots_t, self._knots_log, self._slopes
        if device not in self._on_device:
            self._on_device[device] = tuple(a.to(device) for a in (self._knots_t, self._knots_log, self._slopes))
        return self._on_device[device]

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVP":
        """DDPM / guided-diffusion linear betas, rescaled by 1000/T as guided-diffusion does."""
        scale = 1000.0 / T
        betas = np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)
        return cls(np.cumprod(1.0 - betas), kind="linear")

    @classmethod
    def cosine(cls, T: int = 4000, s: float = 0.008, max_beta: float = 0.999) -> "DiscreteVP":
        """improved-diffusion cosine schedule (Nichol & Dhariwal 2021)."""
        def f(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)])
        return cls(np.cumprod(1.0 - betas), kind="cosine")

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        return cls(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)), kind="table")

    def time_of_index(self, i):
        return (_as_tensor(i).to(torch.float64) + 1) / self.T

    def index_of_time(self, t):
        """Fractional table index of continuous t (t = (i + 1) / T)."""
        return _as_tensor(t) * self.T - 1

    # a time within this many table steps above a knot counts as the knot: a float64 grid such as
    # linspace(0.15, 0, 150) puts some nodes a rounding error above theirs, and beta there must be
    # the segment below, the one the step from that node covers
    KNOT_TOLERANCE = 1e-9

    def _segment(self, t):
        t = _as_tensor(t)
        u = t.detach().to(torch.float64) * self.T
        k = torch.clamp(torch.ceil(u - self.KNOT_TOLERANCE).long() - 1, 0, self.T - 1)
        return t, k

    def log_alpha_bar(self, t):
        t, k = self._segment(t)
        knots_t, knots_log, slopes = self._tables(t.device)
        out = knots_log[k] - slopes[k] * (t.to(torch.float64) - knots_t[k])
        return out.to(t.dtype) if t.is_floating_point() else out

    def beta(self, t):
        t, k = self._segment(t)
        out = self._tables(t.device)[2][k]
        return out.to(t.dtype) if t.is_floating_point() else out

    def t_of_alpha_bar(self, alpha_bar):
        target = -torch.log(_as_tensor(alpha_bar).to(torch.float64))
        knots_t, knots_log, slopes = self._tables(target.device)
        neg_log = -knots_log
        k = torch.clamp(torch.searchsorted(neg_log, target) - 1, 0, self.T - 1)
        return knots_t[k] + (target - neg_log[k]) / slopes[k]

    def t_index_star(self, sigma: float, rule: str = "nearest") -> int:
        """Table index for sigma: 'first' index with sqrt((1-ab)/ab) >= 2 sigma (Carlini et al.),
        or the index with the 'nearest' ratio (DensePure)."""
        alpha_bar_for_sigma(sigma)  # validates sigma
        target = 2.0 * sigma
        ratio = torch.sqrt((1 - self.alpha_bars) / self.alpha_bars)
        if rule == "first":
            above = torch.nonzero(ratio >= target)
            if len(above) == 0:
                raise SdepureError(f"sigma {sigma} exceeds the largest noise level of this schedule")
            return int(above[0])
        if rule == "nearest":
            return int(torch.argmin(torch.abs(ratio - target)))
        raise SdepureError(f"unknown t* rule {rule!r}; choose from {', '.join(T_RULES)}")

    def t_star(self, sigma: float, rule: str | None = "nearest") -> float:
        """t* on the table grid by `rule`, or the exact inverse of the interpolation if rule is None."""
        if rule is None:
            return super().t_star(sigma)
        return float(self.time_of_index(self.t_index_star(sigma, rule)))

    def describe(self) -> dict:
        return {"kind": self.kind, "T": self.T}


def schedule_from_config(cfg: dict) -> VPSchedule:
    """Build a schedule from a config table such as {kind = "linear", beta_min = 0.1, beta_max = 20}."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    try:
        if kind == "linear":
            return LinearVP(**cfg)
        if kind == "discrete-linear":
            return DiscreteVP.linear(**cfg)
        if kind == "discrete-cosine":
            return DiscreteVP.cosine(**cfg)
    except TypeError as e:
        raise SdepureError(f"bad schedule settings for kind {kind!r}: {e}") from None
    raise SdepureError(f"unknown schedule kind {kind!r}; choose linear, discrete-linear or discrete-cosine")
