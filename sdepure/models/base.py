"""One calling convention for every diffusion-model family.

A DiffusionModel maps [-1, 1] images x and continuous times t in [0, 1] (a tensor of shape
(batch,)) to eps(x, t), the noise prediction; score and the x0 prediction follow from it:
    score(x, t) = -eps(x, t) / sqrt(1 - alpha_bar(t))
    x0(x, t)    = (x - sqrt(1 - alpha_bar(t)) eps(x, t)) / sqrt(alpha_bar(t))
Each checkpoint family is adapted by choosing how t is fed to its network (TIME_INPUTS).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import SdepureError
from ..precision import check_precision, run
from ..schedules import DiscreteVP, VPSchedule


def _table(schedule: VPSchedule) -> DiscreteVP:
    if not isinstance(schedule, DiscreteVP):
        raise SdepureError("this time input needs a discrete (table) schedule")
    return schedule


# how each family feeds time to its network
TIME_INPUTS: dict[str, Callable[[torch.Tensor, VPSchedule], torch.Tensor]] = {
    "t": lambda t, s: t,                       # networks trained here on continuous t
    "999t": lambda t, s: 999.0 * t,            # score_sde continuous VP
    "1000t": lambda t, s: 1000.0 * t,          # DiffPure's scale, unfloored
    # DiffPure's feed to guided-diffusion on the continuous VP SDE: (t.float() * 1000).long(). The
    # float32 cast matters: a float64 grid time such as 0.11299999999999999 floors to 112, its
    # float32 value to 113, as DiffPure's does.
    "floor(1000t)": lambda t, s: torch.floor(t.float() * 1000.0),
    "index": lambda t, s: _table(s).index_of_time(t),                          # guided-diffusion
    "index-rescaled": lambda t, s: _table(s).index_of_time(t) * 1000.0 / _table(s).T,  # improved-diffusion
}


def split_variance(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned-variance network's output -> (eps, v): the first `channels` channels are eps."""
    return out[:, :channels], out[:, channels:]


class DiffusionModel(nn.Module):
    """Base class: subclasses define eps (or score, overriding both). A model with a learned
    variance (Nichol & Dhariwal 2021) sets has_variance and defines eps_variance."""
    has_variance = False

    def __init__(self, schedule: VPSchedule):
        super().__init__()
        self.schedule = schedule

    def eps_variance(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's whole output in one call: the C eps channels, then the C channels v that
        interpolate the ancestral step's log variance between beta~ (v = -1) and beta (v = 1)."""
        raise SdepureError(f"{type(self).__name__} has no variance output")

    def _coefs(self, t: torch.Tensor, x: torch.Tensor):
        ab = self.schedule.alpha_bar(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return ab.sqrt(), (1 - ab).sqrt()

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, std = self._coefs(t, x)
        return -self.eps(x, t) / std

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean_coef, std = self._coefs(t, x)
        return (x - std * self.eps(x, t)) / mean_coef


class EpsNetModel(DiffusionModel):
    """Adapter for a network net(x, time_input) -> eps (or 2C channels with learned variance).

    t is clamped to >= t_min because eps / sqrt(1 - alpha_bar) is singular at t = 0; solvers that
    evaluate the drift at the end of their last step (heun, midpoint, reversible_heun) reach it.
    """

    def __init__(self, net: nn.Module, schedule: VPSchedule, time_input: str = "t",
                 learned_sigma: bool = False, t_min: float | None = None):
        super().__init__(schedule)
        if time_input not in TIME_INPUTS:
            raise SdepureError(f"unknown time input {time_input!r}; choose from {', '.join(TIME_INPUTS)}")
        self.net = net
        self.time_input = time_input
        self.learned_sigma = learned_sigma
        if t_min is None:
            t_min = 1.0 / schedule.T if isinstance(schedule, DiscreteVP) else 1e-3
        self.t_min = float(t_min)

    @property
    def has_variance(self) -> bool:
        return self.learned_sigma

    def _net(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]).clamp_min(self.t_min)
        return self.net(x, TIME_INPUTS[self.time_input](t, self.schedule).to(x.dtype))

    def eps(self, x, t):
        out = self._net(x, t)
        return split_variance(out, x.shape[1])[0] if self.learned_sigma else out

    def eps_variance(self, x, t):
        if not self.learned_sigma:
            return super().eps_variance(x, t)
        return self._net(x, t)

    def score(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]).clamp_min(self.t_min)
        return super().score(x, t)


class Autocast(DiffusionModel):
    """`model` with every network call under autocast `precision` (precision.py), results in the
    input's dtype: bound once where a defense is built, so solvers never see the precision."""

    def __init__(self, model: DiffusionModel, precision: str):
        super().__init__(model.schedule)
        check_precision(precision)
        self.inner, self.precision = model, precision

    @property
    def has_variance(self) -> bool:
        return self.inner.has_variance

    def eps(self, x, t):
        return run(self.inner.eps, x, t, precision=self.precision)

    def score(self, x, t):
        return run(self.inner.score, x, t, precision=self.precision)

    def x0(self, x, t):
        return run(self.inner.x0, x, t, precision=self.precision)

    def eps_variance(self, x, t):
        return run(self.inner.eps_variance, x, t, precision=self.precision)


def with_precision(model: DiffusionModel, precision: str) -> DiffusionModel:
    """The model itself at fp32, else its Autocast wrapper."""
    check_precision(precision)
    return model if precision == "fp32" else Autocast(model, precision)
