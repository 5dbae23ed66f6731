"""Reverse-process solvers: pure functions of (model, x_t, time grid, seed) -> x at t_end.

- torchsde methods on the reverse VP-SDE (`euler`, `milstein`, `heun`, `midpoint`,
  `euler_heun`, `reversible_heun`), driven by a GridBrownian addressed by `seed`;
- torchdiffeq methods on the probability-flow ODE (`ode-euler`, `ode-midpoint`, `ode-rk4`,
  `ode-dopri5`), deterministic;
- `ddpm`: DDPM ancestral sampling on a time subsequence, as DensePure's authors ran it.
All take and return [-1, 1] images of any shape (batch first).
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torchdiffeq
import torchsde

from .brownian import GridBrownian, RowBrownian
from .errors import SdepureError
from .models.base import DiffusionModel
from .schedules import DiscreteVP
from .sde import ProbabilityFlowODE, ReverseVPSDE, time_grid

SDE_METHODS = {"euler": "ito", "milstein": "ito", "heun": "stratonovich", "midpoint": "stratonovich",
               "euler_heun": "stratonovich", "reversible_heun": "stratonovich"}
ODE_METHODS = {"ode-euler": "euler", "ode-midpoint": "midpoint", "ode-rk4": "rk4", "ode-dopri5": "dopri5"}
SOLVERS = (*SDE_METHODS, *ODE_METHODS, "ddpm")


def check_solver(method: str) -> None:
    if method not in SOLVERS:
        raise SdepureError(f"unknown solver {method!r}; choose from {', '.join(SOLVERS)}")


ADJOINT_METHODS = {"euler": "euler", "milstein": "milstein", "heun": "heun", "midpoint": "midpoint",
                   "euler_heun": "euler_heun", "reversible_heun": "adjoint_reversible_heun"}
# backward schemes torchsde accepts for each forward method's SDE type (checked by running each pair)
_ADJOINT_ALLOWED = {"ito": ("euler", "milstein"),
                    "stratonovich": ("milstein", "midpoint", "heun", "euler_heun")}


def check_adjoint_method(method: str, adjoint_method: str | None) -> None:
    if adjoint_method is None:
        return
    allowed = _ADJOINT_ALLOWED[SDE_METHODS[method]] if method in SDE_METHODS else ()
    if method == "reversible_heun":
        allowed = (*allowed, "adjoint_reversible_heun")
    if adjoint_method not in allowed:
        raise SdepureError(f"adjoint method {adjoint_method!r} does not pair with solver {method!r}; "
                           f"choose from {', '.join(allowed) or 'none (not an SDE solver)'}")


def reverse_sde(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, seed,
                method: str = "euler", t_end: float = 0.0, grad: str | None = None,
                adjoint_method: str | None = None, states: bool = False):
    """One reverse VP-SDE solve per row from t_start to t_end with torchsde.

    grad=None: torchsde.sdeint. grad="exact": the same solve, differentiated by autograd with
    two levels of recomputation: each network call is checkpointed, and from SEGMENT_FROM steps
    on (one-step methods) the solve runs in segments of ceil(sqrt(steps)) steps, each recomputed
    as a whole in backward. Memory then grows with sqrt(steps) states and never holds more than
    one network's activations, at the price of one more forward pass per step; the segments pass
    gradients to the input only.
    grad="adjoint": torchsde.sdeint_adjoint on the same grid and Brownian path, no gradient
    into the network's weights; adjoint_method defaults to the forward method's own scheme
    (adjoint_reversible_heun for reversible_heun: exact up to floating point).
    `seed`: an int, or a tuple of one seed per row (RowBrownian: a row's path ignores the batch).
    states=True returns (x at t_end, the states after steps 1..steps stacked on a new first axis),
    differentiable in every gradient mode (the adjoint injects each state's gradient as it passes
    that step backwards)."""
    check_adjoint_method(method, adjoint_method)
    grid = time_grid(t_start, t_end, steps)
    sde = ReverseVPSDE(model, grid, x.shape, sde_type=SDE_METHODS[method], checkpoint=grad == "exact")
    y0 = x.reshape(x.shape[0], -1)
    bm = _brownian(seed, y0.shape, y0)
    if states:
        traj = _sde_states(sde, y0, bm, method, steps, grad, adjoint_method)
        traj = traj.reshape(steps, *x.shape)
        return traj[-1], traj
    if grad == "adjoint":
        # integrating over [0, steps] with dt = 1 keeps only the endpoints in memory
        ts = torch.tensor([0.0, float(steps)], dtype=y0.dtype, device=y0.device)
        y = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method=method, dt=1.0, adjoint_params=(),
                                    adjoint_method=adjoint_method or ADJOINT_METHODS[method])[-1]
    elif grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM and method != "reversible_heun":
        y = _in_recomputed_segments(y0, steps, lambda y, k0, k1: _sde_segment(sde, y, bm, method, k0, k1))
    else:
        y = _sde_segment(sde, y0, bm, method, 0, steps)
    return y.reshape(x.shape)


def _brownian(seed, shape, like: torch.Tensor) -> GridBrownian:
    if isinstance(seed, (tuple, list)):
        return RowBrownian(seed, shape, dtype=like.dtype, device=like.device)
    return GridBrownian(seed, shape, dtype=like.dtype, device=like.device)


def _sde_states(sde, y0, bm, method, steps, grad, adjoint_method) -> torch.Tensor:
    """(steps, B, D): the solution after each step, on the same grid and Brownian path as the
    endpoint-only solve. Output times at every integer step change nothing for these fixed-step
    methods with dt = 1 (reversible_heun keeps its second state across output times)."""
    ts = torch.arange(steps + 1, dtype=y0.dtype, device=y0.device)
    if grad == "adjoint":
        # torchsde's adjoint resets its state to the stored forward state at every output time
        # and adds that state's loss gradient to the adjoint there
        return torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method=method, dt=1.0, adjoint_params=(),
                                       adjoint_method=adjoint_method or ADJOINT_METHODS[method])[1:]
    if grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM and method != "reversible_heun":
        return _states_in_recomputed_segments(y0, steps, lambda y, k0, k1: torchsde.sdeint(
            sde, y, ts[k0:k1 + 1], bm=bm, method=method, dt=1.0)[1:])
    return torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=1.0)[1:]


SEGMENT_FROM = 16  # below this, per-step states weigh nothing next to one network's activations
# reversible_heun carries a second state from step to step, so a restart per segment would change
# the solution; it is checkpointed per network call only.


class _Recomputed(torch.autograd.Function):
    """y -> run(y) without an autograd graph (torch.utils.checkpoint keeps one node per operation,
    tens of kB per solver step); backward runs it again with autograd and returns the gradient
    with respect to y only: the network's weights get none, as with the adjoint."""

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


def _in_recomputed_segments(y: torch.Tensor, steps: int, solve_segment) -> torch.Tensor:
    """solve_segment(y, k0, k1) over consecutive segments of ceil(sqrt(steps)) steps, each
    recomputed in backward (_Recomputed)."""
    length = math.isqrt(steps - 1) + 1
    for k0 in range(0, steps, length):
        k1 = min(k0 + length, steps)
        y = _Recomputed.apply(y, lambda y, k0=k0, k1=k1: solve_segment(y, k0, k1))
    return y


class _RecomputedStates(torch.autograd.Function):
    """As _Recomputed, for a segment that returns all its states (n, ...): backward receives the
    gradient of every state (from later segments through the last one, and from losses on the
    states themselves) and recomputes the segment once."""

    @staticmethod
    def forward(ctx, y, run):
        ctx.run = run
        ctx.save_for_backward(y)
        return run(y)

    @staticmethod
    def backward(ctx, grad_states):
        (y,) = ctx.saved_tensors
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            (grad_y,) = torch.autograd.grad(ctx.run(y), y, grad_states)
        return grad_y, None


def _states_in_recomputed_segments(y: torch.Tensor, steps: int, segment_states) -> torch.Tensor:
    """segment_states(y, k0, k1) -> the states after steps k0+1..k1, over the same segments as
    _in_recomputed_segments; returns all states (steps, ...)."""
    length = math.isqrt(steps - 1) + 1
    out = []
    for k0 in range(0, steps, length):
        k1 = min(k0 + length, steps)
        seg = _RecomputedStates.apply(y, lambda y, k0=k0, k1=k1: segment_states(y, k0, k1))
        out.append(seg)
        y = seg[-1]
    return torch.cat(out)


def _sde_segment(sde: ReverseVPSDE, y: torch.Tensor, bm: GridBrownian, method: str, k0: int, k1: int):
    """Solve from step k0 to k1 on the shared grid and Brownian path (both addressed by k)."""
    ts = torch.tensor([float(k0), float(k1)], dtype=y.dtype, device=y.device)
    return torchsde.sdeint(sde, y, ts, bm=bm, method=method, dt=1.0)[-1]


def reverse_ode(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int,
                method: str = "ode-euler", t_end: float = 0.0, rtol: float = 1e-5,
                atol: float = 1e-5, grad: str | None = None, states: bool = False):
    """Probability-flow ODE from t_start to t_end with torchdiffeq.odeint, or with
    torchdiffeq.odeint_adjoint (no gradient into the network's weights) when grad="adjoint";
    grad="exact" recomputes as reverse_sde does (fixed-step methods in segments).
    states=True: (x at t_end, the states at steps 1..steps), as reverse_sde."""
    grid = time_grid(t_start, t_end, steps)
    func = ProbabilityFlowODE(model, grid, x.shape, checkpoint=grad == "exact")
    y0 = x.reshape(x.shape[0], -1)
    ts = torch.tensor([0.0, float(steps)], dtype=y0.dtype, device=y0.device)
    inner = ODE_METHODS[method]
    options = {} if inner == "dopri5" else {"step_size": 1.0}
    if states:
        every = torch.arange(steps + 1, dtype=y0.dtype, device=y0.device)
        if grad == "adjoint":
            traj = torchdiffeq.odeint_adjoint(func, y0, every, method=inner, rtol=rtol, atol=atol, options=options,
                                              adjoint_params=(), adjoint_options=dict(options))[1:]
        elif grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM and inner != "dopri5":
            traj = _states_in_recomputed_segments(y0, steps, lambda y, k0, k1: torchdiffeq.odeint(
                func, y, every[k0:k1 + 1], method=inner, options=options)[1:])
        else:
            traj = torchdiffeq.odeint(func, y0, every, method=inner, rtol=rtol, atol=atol, options=options)[1:]
        traj = traj.reshape(steps, *x.shape)
        return traj[-1], traj
    if grad == "adjoint":
        y = torchdiffeq.odeint_adjoint(func, y0, ts, method=inner, rtol=rtol, atol=atol, options=options,
                                       adjoint_params=(), adjoint_options=dict(options))[-1]
    elif grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM and inner != "dopri5":
        # fixed-step methods restart exactly at a segment boundary (dopri5 would re-adapt)
        def ode_segment(y, k0, k1):
            seg = torch.tensor([float(k0), float(k1)], dtype=y.dtype, device=y.device)
            return torchdiffeq.odeint(func, y, seg, method=inner, options=options)[-1]
        y = _in_recomputed_segments(y0, steps, ode_segment)
    else:
        y = torchdiffeq.odeint(func, y0, ts, method=inner, rtol=rtol, atol=atol, options=options)[-1]
    return y.reshape(x.shape)


def ddpm_times(schedule, t_start: float, steps: int) -> torch.Tensor:
    """Decreasing times ending at 0. On a table: indices round(i* - j i*/b), j = 0..b-1, as DensePure."""
    if steps < 1:
        raise SdepureError(f"steps must be >= 1, got {steps}")
    if isinstance(schedule, DiscreteVP):
        i_star = int(round(float(schedule.index_of_time(torch.tensor(t_start, dtype=torch.float64)))))
        idx = sorted({int(round(i_star - j * i_star / steps)) for j in range(steps)}, reverse=True)
        times = [float(schedule.time_of_index(i)) for i in idx]
    else:
        times = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()
    return torch.tensor(times + [0.0], dtype=torch.float64)


def ddpm_ancestral(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, seed,
                   clip_x0: bool = True, grad: str | None = None, states: bool = False):
    """DDPM ancestral steps on a subsequence, betas re-derived from alpha_bar; no noise at the last step.
    grad="exact" recomputes each network call in backward (checkpointing).
    states=True: (x at 0, the state after each step, at ddpm_times(...)[1:])."""
    times = ddpm_times(model.schedule, t_start, steps)
    ab = model.schedule.alpha_bar(times)
    ab[-1] = 1.0
    bm = _brownian(seed, x.shape, x)
    traj = []
    for k in range(len(times) - 1):
        a, a_next = float(ab[k]), float(ab[k + 1])
        t_vec = torch.full((x.shape[0],), float(times[k]), dtype=x.dtype, device=x.device)
        if grad == "exact" and torch.is_grad_enabled():
            eps = torch.utils.checkpoint.checkpoint(model.eps, x, t_vec, use_reentrant=False)
        else:
            eps = model.eps(x, t_vec)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        alpha = a / a_next
        mean = (a_next ** 0.5 * (1 - alpha) / (1 - a)) * x0 + (alpha ** 0.5 * (1 - a_next) / (1 - a)) * x
        if k < len(times) - 2:
            var = (1 - alpha) * (1 - a_next) / (1 - a)
            x = mean + var ** 0.5 * bm.increment(k)
        else:
            x = mean
        if states:
            traj.append(x)
    return (x, torch.stack(traj)) if states else x


GRADS = (None, "exact", "adjoint")


def solve(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, seed,
          method: str = "euler", clip_x0: bool = True, grad: str | None = None,
          adjoint_method: str | None = None, states: bool = False):
    """Dispatch on `method` (see SOLVERS); returns the reverse-process output at t = 0.
    `clip_x0` clips ddpm's x0 predictions to [-1, 1] (images); the other solvers ignore it.
    `grad`: None (plain autograd), "exact" (checkpointed autograd) or "adjoint".
    `seed`: an int, or a tuple of one seed per row (the row's Brownian path / ancestral noise).
    states=True returns (x at 0, states, times): the state after every step (n, *x.shape),
    differentiable in the same gradient mode, and the float64 times they sit at (n,)."""
    check_solver(method)
    if grad not in GRADS:
        raise SdepureError(f"unknown gradient mode {grad!r} for the solver")
    if method in SDE_METHODS:
        out = reverse_sde(model, x, t_start, steps, seed, method, grad=grad, adjoint_method=adjoint_method,
                          states=states)
    elif method in ODE_METHODS:
        out = reverse_ode(model, x, t_start, steps, method, grad=grad, states=states)
    elif grad == "adjoint":
        raise SdepureError("the ddpm sampler has no adjoint; use grad exact, or an SDE/ODE solver")
    else:
        out = ddpm_ancestral(model, x, t_start, steps, seed, clip_x0, grad=grad, states=states)
    if not states:
        return out
    times = (ddpm_times(model.schedule, t_start, steps) if method == "ddpm"
             else time_grid(t_start, 0.0, steps))[1:]
    return (*out, times)
