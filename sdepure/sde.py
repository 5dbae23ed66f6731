"""The reverse VP-SDE and its probability-flow ODE, written in step-index time.

Forward VP-SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW on t in [0, 1].
Reverse from t_start down to t_end on a uniform grid t_k = t_grid[k], k = 0..steps, built once
in float64. torchsde and torchdiffeq need increasing time, and their fixed-step loops add dt to
the current time; so the variable they integrate over is the step index k itself (exact in
floating point), and the physical time is read off the grid. With h = t_k - t_{k+1}:
    reverse SDE: dx = h [1/2 beta x + beta score] dk + sqrt(h beta) dW_k
    PF-ODE:      dx/dk = h [1/2 beta x + 1/2 beta score]
Since g depends on time only the noise is additive: the Ito and Stratonovich forms coincide,
so sde_type can be either and follows the chosen method.
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from .errors import SdepureError
from .models.base import DiffusionModel


def time_grid(t_start: float, t_end: float, steps: int) -> torch.Tensor:
    if steps < 1:
        raise SdepureError(f"steps must be >= 1, got {steps}")
    if not (0.0 <= t_end < t_start <= 1.0):
        raise SdepureError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


class _IndexTime(nn.Module):
    """Shared by the SDE and the ODE: maps step index k to physical time t on the grid."""

    def __init__(self, model: DiffusionModel, t_grid: torch.Tensor, shape, checkpoint: bool = False):
        super().__init__()
        self.model = model
        self.checkpoint = checkpoint  # recompute the network in backward instead of storing activations
        self.t_grid = t_grid
        self.h = float(t_grid[0] - t_grid[1])
        self.shape = tuple(shape)  # image shape incl. batch; y is the flattened view
        self.steps = len(t_grid) - 1

    def physical_time(self, k) -> float:
        k = float(k.detach()) if torch.is_tensor(k) else float(k)
        i = min(max(int(math.floor(k)), 0), self.steps - 1)
        frac = k - i
        if frac == 0.0:
            return float(self.t_grid[i])
        return float(self.t_grid[i] + frac * (self.t_grid[i + 1] - self.t_grid[i]))

    def _drift(self, k, y, score_weight: float):
        t = self.physical_time(k)
        beta = float(self.model.schedule.beta(torch.tensor(t, dtype=torch.float64)))
        x = y.reshape(self.shape)
        t_vec = torch.full((x.shape[0],), t, dtype=y.dtype, device=y.device)
        if self.checkpoint and torch.is_grad_enabled():
            score = torch.utils.checkpoint.checkpoint(self.model.score, x, t_vec, use_reentrant=False)
        else:
            score = self.model.score(x, t_vec)
        return (self.h * beta * (0.5 * x + score_weight * score)).reshape(y.shape)


class ReverseVPSDE(_IndexTime):
    noise_type = "diagonal"

    def __init__(self, model: DiffusionModel, t_grid: torch.Tensor, shape, sde_type: str = "ito",
                 checkpoint: bool = False):
        super().__init__(model, t_grid, shape, checkpoint)
        self.sde_type = sde_type
        self._memo = None

    def f(self, k, y):
        # sdeint evaluates f(ts[0], y0) once to check shapes and the first step asks again; a
        # solve in segments (solvers.reverse_sde) starts sdeint at every segment's first step.
        memo = self._memo
        k_val = float(k.detach()) if torch.is_tensor(k) else float(k)
        if memo is not None and memo[0] is y and memo[1] == k_val and memo[2] == y._version:
            self._memo = None
            return memo[3]
        out = self._drift(k, y, 1.0)
        self._memo = (y, k_val, y._version, out)
        return out

    def g(self, k, y):
        t = self.physical_time(k)
        beta = float(self.model.schedule.beta(torch.tensor(t, dtype=torch.float64)))
        return torch.full_like(y, math.sqrt(self.h * beta))


class ProbabilityFlowODE(_IndexTime):
    """torchdiffeq calls forward(k, y)."""

    def forward(self, k, y):
        return self._drift(k, y, 0.5)
