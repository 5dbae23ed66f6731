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

No host-device synchronisation per step: the solvers hand k over as a Python float or a CPU
tensor, and the grid and beta are read as Python floats (beta cached per time), so a step only
queues device work.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import SdepureError
from .models.base import DiffusionModel


def time_grid(t_start: float, t_end: float, steps: int) -> torch.Tensor:
    if steps < 1:
        raise SdepureError(f"steps must be >= 1, got {steps}")
    if not (0.0 <= t_end < t_start <= 1.0):
        raise SdepureError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


class _Recomputed(torch.autograd.Function):
    """y -> run(y) without an autograd graph (torch.utils.checkpoint keeps one node per operation,
    tens of kB per solver step, and would also send gradients into the network's weights);
    backward runs it again with autograd and returns the gradient with respect to y only: the
    network's weights get none, as with the adjoint."""

    @staticmethod
    def forward(ctx, y, run):
        ctx.run = run
        ctx.save_for_backward(y)
        return run(y)

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            (grad_y,) = torch.autograd.grad(ctx.run(y), y, grad_out)
        return grad_y, None


def recomputed(run, y: torch.Tensor) -> torch.Tensor:
    """run(y), recomputed in backward, with a gradient for y only (exact-gradient mode)."""
    return _Recomputed.apply(y, run)


def _as_float(k) -> float:
    # a Python float or a CPU tensor (the solvers keep step times there): no device read
    return float(k.detach()) if torch.is_tensor(k) else float(k)


def network_call(fn, x: torch.Tensor, t: float, exact: bool = False) -> torch.Tensor:
    """fn(x, t) for a model method fn (eps, score, x0 or eps_variance) at the Python float time t.
    exact: recompute it in backward, gradient to x only (see _Recomputed)."""
    t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # a fill: no host read

    def call(x):
        return fn(x, t_vec)
    if exact and torch.is_grad_enabled():
        return recomputed(call, x)
    return call(x)


class _IndexTime(nn.Module):
    """Shared by the SDE and the ODE: maps step index k to physical time t on the grid."""

    def __init__(self, model: DiffusionModel, t_grid: torch.Tensor, shape, checkpoint: bool = False):
        super().__init__()
        self.model = model
        self.checkpoint = checkpoint  # exact gradients: recompute each network call in backward
        self.t_grid = t_grid
        self._t = [float(t) for t in t_grid]  # Python floats: reading them never synchronises
        self.h = self._t[0] - self._t[1]
        self.shape = tuple(shape)  # image shape incl. batch; y is the flattened view
        self.steps = len(t_grid) - 1
        self._beta: dict[float, float] = {}

    def physical_time(self, k) -> float:
        k = _as_float(k)
        i = min(max(int(math.floor(k)), 0), self.steps - 1)
        frac = k - i
        if frac == 0.0:
            return self._t[i]
        return self._t[i] + frac * (self._t[i + 1] - self._t[i])

    def beta(self, t: float) -> float:
        b = self._beta.get(t)
        if b is None:
            b = self._beta[t] = float(self.model.schedule.beta(torch.tensor(t, dtype=torch.float64)))
        return b

    def _drift(self, k, y, score_weight: float):
        t = self.physical_time(k)
        beta = self.beta(t)
        x = y.reshape(self.shape)
        score = network_call(self.model.score, x, t, self.checkpoint)
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
        k_val = _as_float(k)
        if memo is not None and memo[0] is y and memo[1] == k_val and memo[2] == y._version:
            self._memo = None
            return memo[3]
        out = self._drift(k_val, y, 1.0)
        self._memo = (y, k_val, y._version, out)
        return out

    def g(self, k, y):
        return torch.full_like(y, math.sqrt(self.h * self.beta(self.physical_time(k))))


class ProbabilityFlowODE(_IndexTime):
    """torchdiffeq calls forward(k, y)."""

    def forward(self, k, y):
        return self._drift(k, y, 0.5)
