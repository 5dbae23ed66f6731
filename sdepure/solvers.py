"""Reverse-process solvers: pure functions of (model, x_t, time grid, noise) -> x at t_end.

- torchsde methods on the reverse VP-SDE (`euler`, `milstein`, `heun`, `midpoint`,
  `euler_heun`, `reversible_heun`), driven by a GridBrownian;
- probability-flow ODE methods (`ode-euler`, `ode-midpoint`, `ode-rk4`, `ode-dopri5`),
  deterministic: the fixed-step ones run here with torchdiffeq's formulas (its loop compares
  device tensors every step), dopri5 and the adjoint run in torchdiffeq;
- samplers on the time subsequence of `ddpm_times` (DensePure's rule; the model's own timesteps on
  a table): `ddpm`, DDPM ancestral sampling as DensePure's authors ran it (with the model's learned
  variance where it has one, `variance="learned"`); `ddim`, DDIM (Song et al. 2021), deterministic
  at eta = 0; `dpm-solver-2m`, DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver
  of the probability-flow ODE in data prediction.
All take and return [-1, 1] images of any shape (batch first). A `Sampler` names the method and
its options; the noise is a GridBrownian made by the caller (its address and generator bound
there), and the network's precision is bound into the model (models.base.with_precision).

Hot paths queue device work only: step times and coefficients are Python floats computed before
the loop, times handed to torchsde live on the CPU, and the Gaussian draws can be made on the
device (rng.Draws("device")).

Exact gradients (grad="exact") are input-only at every step count and for every method: each
network call is recomputed in backward by sde.recomputed, and one-state methods from SEGMENT_FROM
steps on also run in recomputed segments of ceil(sqrt(steps)) steps. The network's weights get no
gradient, as with the adjoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchdiffeq
import torchsde
from torch import nn

from .brownian import GridBrownian
from .errors import SdepureError
from .models.base import DiffusionModel, split_variance
from .schedules import DiscreteVP
from .sde import ProbabilityFlowODE, ReverseVPSDE, network_call, recomputed, time_grid

SDE_METHODS = {"euler": "ito", "milstein": "ito", "heun": "stratonovich", "midpoint": "stratonovich",
               "euler_heun": "stratonovich", "reversible_heun": "stratonovich"}
ODE_METHODS = {"ode-euler": "euler", "ode-midpoint": "midpoint", "ode-rk4": "rk4", "ode-dopri5": "dopri5"}
SUBSEQUENCE_METHODS = ("ddpm", "ddim", "dpm-solver-2m")
SOLVERS = (*SDE_METHODS, *ODE_METHODS, *SUBSEQUENCE_METHODS)
NO_ADJOINT = SUBSEQUENCE_METHODS  # written here step by step: exact gradients only
# the ddpm step's variance: the model's own interpolation (Nichol & Dhariwal 2021, eq. 15), the
# posterior variance beta~ (DDPM's sigma^2 = beta~), or beta (DDPM's other fixed choice)
VARIANCES = ("learned", "posterior", "beta")


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


def check_eta(eta: float, method: str = "ddim") -> None:
    """ddim's noise level: in [0, 1], and nonzero for ddim only."""
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise SdepureError(f"ddim eta must be in [0, 1], got {eta!r}")
    if method != "ddim" and eta != 0.0:
        raise SdepureError(f"eta applies to the ddim solver only (solver is {method})")


def has_step_variance(method: str) -> bool:
    """Whether the step variance is a choice: for the ddpm sampler only (ddim's noise comes from
    eta, and the other solvers follow the SDE or the probability-flow ODE, whose noise is fixed by
    beta(t))."""
    return method == "ddpm"


def check_variance(method: str, variance: str | None) -> None:
    """`variance` None: not chosen (ddpm then takes the posterior variance)."""
    if variance is None:
        return
    if variance not in VARIANCES:
        raise SdepureError(f"unknown variance {variance!r}; choose from {', '.join(VARIANCES)}")
    if not has_step_variance(method):
        raise SdepureError(f"variance {variance} applies to the ddpm solver only (solver is {method}; its "
                           f"noise does not come from a step variance)")


@dataclass(frozen=True)
class Sampler:
    """How the reverse process is solved: `method` (SOLVERS) over `steps` steps, ddim's noise level
    `eta`, ddpm's step `variance` (None: the posterior variance), the adjoint's backward scheme,
    and whether the subsequence samplers clip their x0 predictions to [-1, 1] (images)."""
    method: str = "euler"
    steps: int = 10
    eta: float = 0.0
    variance: str | None = None
    adjoint_method: str | None = None
    clip_x0: bool = True

    def __post_init__(self):
        check_solver(self.method)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SdepureError(f"steps must be an integer >= 1, got {self.steps!r}")
        check_eta(self.eta, self.method)
        check_variance(self.method, self.variance)
        check_adjoint_method(self.method, self.adjoint_method)

    @property
    def deterministic(self) -> bool:
        """No noise: the same input always gives the same output (PF-ODE solvers, dpm-solver-2m,
        ddim at eta = 0, and one ddpm step: the x0 prediction)."""
        return (self.method in ODE_METHODS or self.method == "dpm-solver-2m"
                or (self.method == "ddim" and self.eta == 0.0) or (self.method == "ddpm" and self.steps == 1))

    def times(self, schedule, t_start: float) -> torch.Tensor:
        """The float64 times of the states after steps 1..n (what solve(..., states=True) returns)."""
        if self.method in SUBSEQUENCE_METHODS:
            return ddpm_times(schedule, t_start, self.steps)[1:]
        return time_grid(t_start, 0.0, self.steps)[1:]


def _step_times(steps: int, dtype) -> torch.Tensor:
    # on the CPU whatever the state's device: torchsde hands these times to f, g and the Brownian
    # motion, and reading a CPU scalar is no device synchronisation
    return torch.tensor([0.0, float(steps)], dtype=dtype)


def _brownian(noise, x: torch.Tensor) -> GridBrownian:
    """The caller's GridBrownian, or one block of the CPU stream for an int seed."""
    if isinstance(noise, GridBrownian):
        return noise
    if isinstance(noise, int) and not isinstance(noise, bool):
        return GridBrownian.like(noise, x)
    raise SdepureError("this solver draws noise: pass noise=GridBrownian(...) or an int seed")


def reverse_sde(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, noise,
                method: str = "euler", t_end: float = 0.0, grad: str | None = None,
                adjoint_method: str | None = None, states: bool = False):
    """One reverse VP-SDE solve per row from t_start to t_end with torchsde, increment k of the
    path being increment k of `noise` (a GridBrownian of x's shape, or an int seed).

    grad=None: torchsde.sdeint. grad="exact": the same solve, differentiated by autograd with
    two levels of recomputation: each network call is recomputed in backward, and from
    SEGMENT_FROM steps on (one-step methods) the solve runs in segments of ceil(sqrt(steps))
    steps, each recomputed as a whole in backward. Memory then grows with sqrt(steps) states and
    never holds more than one network's activations, at the price of one more forward pass per
    step; gradients go to the input only.
    grad="adjoint": torchsde.sdeint_adjoint on the same grid and Brownian path, no gradient
    into the network's weights; adjoint_method defaults to the forward method's own scheme
    (adjoint_reversible_heun for reversible_heun: exact up to floating point).
    states=True returns (x at t_end, the states after steps 1..steps stacked on a new first axis),
    differentiable in every gradient mode (see _sde_states)."""
    check_adjoint_method(method, adjoint_method)
    grid = time_grid(t_start, t_end, steps)
    sde = ReverseVPSDE(model, grid, x.shape, sde_type=SDE_METHODS[method], checkpoint=grad == "exact")
    y0 = x.reshape(x.shape[0], -1)
    bm = _brownian(noise, x).reshaped(y0.shape)
    if states:
        return _as_states(_sde_states(sde, y0, bm, method, steps, grad, adjoint_method), x.shape)
    if grad == "adjoint":
        # integrating over [0, steps] with dt = 1 keeps only the endpoints in memory
        y = torchsde.sdeint_adjoint(sde, y0, _step_times(steps, y0.dtype), bm=bm, method=method, dt=1.0,
                                    adjoint_params=(), adjoint_method=adjoint_method or ADJOINT_METHODS[method])[-1]
    elif grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM and method != "reversible_heun":
        y = _in_recomputed_segments(y0, steps, lambda y, k0, k1: _sde_segment(sde, y, bm, method, k0, k1))
    else:
        y = _sde_segment(sde, y0, bm, method, 0, steps)
    return y.reshape(x.shape)


SEGMENT_FROM = 16  # below this, per-step states weigh nothing next to one network's activations
# reversible_heun and dpm-solver-2m carry a second state from step to step, so a restart per
# segment would change the solution; they recompute each network call only.


def _in_recomputed_segments(y: torch.Tensor, steps: int, solve_segment) -> torch.Tensor:
    """solve_segment(y, k0, k1) over consecutive segments of ceil(sqrt(steps)) steps, each
    recomputed in backward (sde.recomputed)."""
    length = math.isqrt(steps - 1) + 1
    for k0 in range(0, steps, length):
        k1 = min(k0 + length, steps)
        y = recomputed(lambda y, k0=k0, k1=k1: solve_segment(y, k0, k1), y)
    return y


def _as_states(traj: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    traj = traj.reshape(traj.shape[0], *shape)
    return traj[-1], traj


def _states_in_recomputed_segments(y: torch.Tensor, steps: int, segment_states) -> torch.Tensor:
    """As _in_recomputed_segments for segment_states(y, k0, k1) -> the states after steps
    k0+1..k1 stacked (one tensor, recomputed once per segment in backward, which receives the
    gradient of every state); returns all states (steps, ...)."""
    length = math.isqrt(steps - 1) + 1
    out = []
    for k0 in range(0, steps, length):
        k1 = min(k0 + length, steps)
        out.append(recomputed(lambda y, k0=k0, k1=k1: segment_states(y, k0, k1), y))
        y = out[-1][-1]
    return torch.cat(out)


def _sde_states(sde, y0, bm, method, steps, grad, adjoint_method) -> torch.Tensor:
    """(steps, B, D): the solution after each step, on the same grid and Brownian path as the
    endpoint-only solve. Output times at every integer step change nothing for these fixed-step
    methods with dt = 1 (reversible_heun keeps its second state across output times)."""
    ts = torch.arange(steps + 1, dtype=y0.dtype)  # CPU, see _step_times
    if grad == "adjoint":
        # torchsde's adjoint resets its state to the stored forward state at every output time
        # and adds that state's loss gradient to the adjoint there
        return torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method=method, dt=1.0, adjoint_params=(),
                                       adjoint_method=adjoint_method or ADJOINT_METHODS[method])[1:]
    if grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM and method != "reversible_heun":
        return _states_in_recomputed_segments(y0, steps, lambda y, k0, k1: torchsde.sdeint(
            sde, y, ts[k0:k1 + 1], bm=bm, method=method, dt=1.0)[1:])
    return torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=1.0)[1:]


def _sde_segment(sde: ReverseVPSDE, y: torch.Tensor, bm: GridBrownian, method: str, k0: int, k1: int):
    """Solve from step k0 to k1 on the shared grid and Brownian path (both addressed by k)."""
    ts = torch.tensor([float(k0), float(k1)], dtype=y.dtype)  # CPU, see _step_times
    return torchsde.sdeint(sde, y, ts, bm=bm, method=method, dt=1.0)[-1]


_ONE_THIRD, _TWO_THIRDS = 1 / 3, 2 / 3


def _ode_steps(func: ProbabilityFlowODE, y: torch.Tensor, inner: str, k0: int, k1: int,
               states: bool = False) -> torch.Tensor:
    """Fixed steps k0 -> k1 (dk = 1) with torchdiffeq's formulas (rk4 is its 3/8-rule variant);
    states=True: every state after k0, stacked."""
    traj = []
    for k in range(k0, k1):
        f0 = func(k, y)
        if inner == "euler":
            y = y + f0
        elif inner == "midpoint":
            y = y + func(k + 0.5, y + 0.5 * f0)
        else:
            f1 = func(k + _ONE_THIRD, y + f0 * _ONE_THIRD)
            f2 = func(k + _TWO_THIRDS, y + (f1 - f0 * _ONE_THIRD))
            f3 = func(k + 1, y + (f0 - f1 + f2))
            y = y + (f0 + 3 * (f1 + f2) + f3) * 0.125
        if states:
            traj.append(y)
    return torch.stack(traj) if states else y


def reverse_ode(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int,
                method: str = "ode-euler", t_end: float = 0.0, rtol: float = 1e-5,
                atol: float = 1e-5, grad: str | None = None, states: bool = False):
    """Probability-flow ODE from t_start to t_end: fixed-step methods step by step here,
    ode-dopri5 with torchdiffeq.odeint; grad="adjoint": torchdiffeq.odeint_adjoint (no gradient
    into the network's weights); grad="exact" recomputes as reverse_sde does (fixed-step methods
    in segments). states=True: (x at t_end, the states at steps 1..steps), as reverse_sde."""
    grid = time_grid(t_start, t_end, steps)
    func = ProbabilityFlowODE(model, grid, x.shape, checkpoint=grad == "exact")
    y0 = x.reshape(x.shape[0], -1)
    inner = ODE_METHODS[method]
    options = {} if inner == "dopri5" else {"step_size": 1.0}
    if states:
        every = torch.arange(steps + 1, dtype=y0.dtype, device=y0.device)
        if grad == "adjoint":  # the adjoint adds each state's gradient at its output time
            traj = torchdiffeq.odeint_adjoint(func, y0, every, method=inner, rtol=rtol, atol=atol, options=options,
                                              adjoint_params=(), adjoint_options=dict(options))[1:]
        elif inner == "dopri5":
            traj = torchdiffeq.odeint(func, y0, every, method=inner, rtol=rtol, atol=atol, options=options)[1:]
        elif grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM:
            traj = _states_in_recomputed_segments(y0, steps, lambda y, k0, k1: _ode_steps(func, y, inner, k0, k1, True))
        else:
            traj = _ode_steps(func, y0, inner, 0, steps, True)
        return _as_states(traj, x.shape)
    if grad == "adjoint":
        ts = torch.tensor([0.0, float(steps)], dtype=y0.dtype, device=y0.device)
        y = torchdiffeq.odeint_adjoint(func, y0, ts, method=inner, rtol=rtol, atol=atol, options=options,
                                       adjoint_params=(), adjoint_options=dict(options))[-1]
    elif inner == "dopri5":
        ts = torch.tensor([0.0, float(steps)], dtype=y0.dtype, device=y0.device)
        y = torchdiffeq.odeint(func, y0, ts, method=inner, rtol=rtol, atol=atol, options=options)[-1]
    elif grad == "exact" and torch.is_grad_enabled() and steps >= SEGMENT_FROM:
        y = _in_recomputed_segments(y0, steps, lambda y, k0, k1: _ode_steps(func, y, inner, k0, k1))
    else:
        y = _ode_steps(func, y0, inner, 0, steps)
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


def _subsequence(model: DiffusionModel, t_start: float, steps: int, times=None):
    """(times, alpha_bars) as Python floats; alpha_bar = 1 at t = 0 (where the table has none)."""
    times = ddpm_times(model.schedule, t_start, steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    ab = model.schedule.alpha_bar(times).tolist()
    times = times.tolist()
    if times[-1] == 0.0:
        ab[-1] = 1.0
    return times, ab


def _x0_from_eps(x, eps, a, clip_x0):
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


def _x0(model, x, t, a, clip_x0, exact):
    """The model's x0 prediction at t (alpha_bar a), optionally clipped to the image range."""
    return _x0_from_eps(x, network_call(model.eps, x, t, exact), a, clip_x0)


def _in_steps(x, n: int, exact: bool, step, states: bool = False):
    """Apply step(x, k) for k < n, in recomputed segments for exact gradients from SEGMENT_FROM on.
    states=True: (x after the last step, every state after each step stacked)."""
    def run(x, k0, k1):
        traj = []
        for k in range(k0, k1):
            x = step(x, k)
            traj.append(x)
        return torch.stack(traj) if states else x
    segmented = exact and torch.is_grad_enabled() and n >= SEGMENT_FROM
    if not states:
        return _in_recomputed_segments(x, n, run) if segmented else run(x, 0, n)
    traj = _states_in_recomputed_segments(x, n, run) if segmented else run(x, 0, n)
    return traj[-1], traj


def ddpm_log_variances(ab: list[float]) -> list[tuple[float, float]]:
    """Per step k of a chain with alpha_bars ab (ab[-1] = 1 at t = 0): (log beta_k, log beta~_k)
    with beta_k = 1 - ab[k] / ab[k+1] and beta~_k = beta_k (1 - ab[k+1]) / (1 - ab[k]), taken on
    the chain itself (the respaced one). beta~ = 0 at the last step, whose log takes the previous
    step's value, as improved-diffusion clips it (that step adds no noise either way)."""
    out = []
    for k in range(len(ab) - 1):
        beta = 1 - ab[k] / ab[k + 1]
        post = beta * (1 - ab[k + 1]) / (1 - ab[k])
        out.append((math.log(beta), math.log(post) if post > 0 else (out[-1][1] if out else math.log(beta))))
    return out


def ddpm_ancestral(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, noise=None,
                   clip_x0: bool = True, grad: str | None = None, variance: str | None = None,
                   states: bool = False):
    """DDPM ancestral steps on a subsequence, betas re-derived from alpha_bar; no noise at the last step.
    Step k adds increment k of `noise` (a GridBrownian of x's shape, or an int seed) times the
    step's standard deviation: sqrt(beta~_k) (variance "posterior" or None), sqrt(beta_k) ("beta"), or the
    model's own (Nichol & Dhariwal 2021, eq. 15: "learned"),
        log sigma_k^2 = f log beta_k + (1 - f) log beta~_k,  f = (v + 1) / 2,
    v being the network's variance channels from the same call as eps (model.eps_variance).
    states=True: (x at 0, the state after each step, at ddpm_times(...)[1:])."""
    check_variance("ddpm", variance)
    variance = variance or "posterior"
    times, ab = _subsequence(model, t_start, steps)
    n, exact = len(times) - 1, grad == "exact"
    bm = _brownian(noise, x) if n > 1 else None
    logs = ddpm_log_variances(ab)
    learned = variance == "learned"
    channels = x.shape[1]

    def step(x, k):
        a, a_next = ab[k], ab[k + 1]
        if learned:
            eps, v = split_variance(network_call(model.eps_variance, x, times[k], exact), channels)
        else:
            eps = network_call(model.eps, x, times[k], exact)
        x0 = _x0_from_eps(x, eps, a, clip_x0)
        alpha = a / a_next
        mean = (a_next ** 0.5 * (1 - alpha) / (1 - a)) * x0 + (alpha ** 0.5 * (1 - a_next) / (1 - a)) * x
        if k == n - 1:
            return mean
        log_beta, log_post = logs[k]
        if learned:
            f = (v + 1) / 2
            std = torch.exp(0.5 * (f * log_beta + (1 - f) * log_post))
        else:
            std = math.exp(0.5 * (log_beta if variance == "beta" else log_post))
        return mean + std * bm.increment(k)
    return _in_steps(x, n, exact, step, states)


def ddim(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, noise=None, eta: float = 0.0,
         clip_x0: bool = True, grad: str | None = None, *, times=None, states: bool = False):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on the subsequence of ddpm_times (or `times`, decreasing):
        x0_k   = (x_k - sqrt(1 - a_k) eps(x_k, t_k)) / sqrt(a_k)     (clipped if clip_x0)
        s_k    = eta sqrt((1 - a_{k+1}) / (1 - a_k)) sqrt(1 - a_k / a_{k+1})
        x_{k+1} = sqrt(a_{k+1}) x0_k + sqrt(1 - a_{k+1} - s_k^2) eps_k + s_k z_k
    with eps_k re-derived from the clipped x0_k. eta = 0: the deterministic, first-order
    probability-flow sampler; eta = 1: the same chain as ddpm with the posterior variance, step for
    step (z_k is increment k of the same `noise`)."""
    check_eta(eta)
    times, ab = _subsequence(model, t_start, steps, times)
    bm = _brownian(noise, x) if eta > 0 else None
    n, exact = len(times) - 1, grad == "exact"
    coefs = []
    for k in range(n):
        a, a_next = ab[k], ab[k + 1]
        s = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        coefs.append((a, a_next, s, math.sqrt(max(1 - a_next - s * s, 0.0))))

    def step(x, k):
        a, a_next, s, c = coefs[k]
        x0 = _x0(model, x, times[k], a, clip_x0, exact)
        x_next = a_next ** 0.5 * x0
        if c > 0:
            x_next = x_next + (c / (1 - a) ** 0.5) * (x - a ** 0.5 * x0)
        if s > 0:
            x_next = x_next + s * bm.increment(k)
        return x_next
    return _in_steps(x, n, exact, step, states)


def dpm_solver_2m(model: DiffusionModel, x: torch.Tensor, t_start: float, steps: int, clip_x0: bool = True,
                  grad: str | None = None, *, times=None, states: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the subsequence of ddpm_times (or `times`).
    With alpha_k = sqrt(a_k), sigma_k = sqrt(1 - a_k), lambda_k = log(alpha_k / sigma_k),
    h_k = lambda_{k+1} - lambda_k and D_k the data prediction x0(x_k, t_k):
        x_{k+1} = (sigma_{k+1} / sigma_k) x_k - alpha_{k+1} (exp(-h_k) - 1) Dhat_k
        Dhat_0 = D_0;  Dhat_k = (1 + 1 / (2 r_k)) D_k - 1 / (2 r_k) D_{k-1},  r_k = h_{k-1} / h_k.
    A step that ends at t = 0 (sigma = 0, lambda = infinity) is the first-order limit x = D_k.
    One network call per step; the multistep history makes it second order in the step size."""
    times, ab = _subsequence(model, t_start, steps, times)
    n, exact = len(times) - 1, grad == "exact"
    plan = []  # per step: (ratio sigma_{k+1}/sigma_k, alpha_{k+1}(exp(-h) - 1), 1/(2 r) or None)
    h_prev = None
    for k in range(n):
        a, a_next = ab[k], ab[k + 1]
        if a_next >= 1.0:
            plan.append(None)
            continue
        lam = 0.5 * math.log(a / (1 - a))
        lam_next = 0.5 * math.log(a_next / (1 - a_next))
        h = lam_next - lam
        w = None if h_prev is None else h / (2 * h_prev)  # 1 / (2 r_k)
        plan.append((math.sqrt((1 - a_next) / (1 - a)), math.sqrt(a_next) * math.expm1(-h), w))
        h_prev = h
    d_prev, traj = None, []
    for k in range(n):
        d = _x0(model, x, times[k], ab[k], clip_x0, exact)
        if plan[k] is None:
            x = d
        else:
            ratio, phi, w = plan[k]
            d_hat = d if w is None else (1 + w) * d - w * d_prev
            x = ratio * x - phi * d_hat
        d_prev = d
        traj.append(x)
    return (x, torch.stack(traj)) if states else x


# -- when exact gradients need recomputation -----------------------------------------------

EXACT_GRAPH_BUDGET = 64 * 2 ** 20  # bytes a plain autograd graph of one exact solve may keep
# network calls per step of each fixed-step method (dopri5 adapts: unknown, always recomputed)
CALLS_PER_STEP = {"euler": 1, "milstein": 1, "heun": 2, "midpoint": 2, "euler_heun": 2, "reversible_heun": 1,
                  "ode-euler": 1, "ode-midpoint": 2, "ode-rk4": 4, "ddpm": 1, "ddim": 1, "dpm-solver-2m": 1}


def graph_bytes(fn, x: torch.Tensor, t: float) -> int:
    """Bytes the autograd graph of one network call fn(x, t) keeps: its saved tensors, each
    storage once, the network's parameters (which exist anyway) left out. Runs the call once."""
    params = {p.untyped_storage().data_ptr() for p in getattr(fn, "__self__", nn.Module()).parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x.detach().requires_grad_(True), torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
    return sum(saved.values())


def plain_graph_fits(model: DiffusionModel, method: str, steps: int, rows: int, call_bytes_per_row: float,
                     state_bytes_per_row: int, budget: int = EXACT_GRAPH_BUDGET) -> bool:
    """Whether exact gradients may skip recomputation: the weights are frozen (a plain graph then
    sends gradients to the input only, as recomputation does) and the whole solve's graph, network
    calls and solver states, stays within `budget` bytes. The gradient is the same either way;
    recomputation only trades time for memory (one more forward pass per network call)."""
    calls = CALLS_PER_STEP.get(method)
    if calls is None or any(p.requires_grad for p in model.parameters()):
        return False
    per_step = calls * call_bytes_per_row + (calls + 4) * state_bytes_per_row
    return rows * steps * per_step <= budget


GRADS = (None, "exact", "adjoint")


def solve(model: DiffusionModel, x: torch.Tensor, t_start: float, sampler: Sampler, noise=None,
          grad: str | None = None, states: bool = False):
    """The reverse process from t_start to 0 as `sampler` says (see Sampler and SOLVERS).
    `noise`: the GridBrownian of x's rows (its address and generator chosen by the caller), or an
    int seed for one block of the CPU stream; unused by deterministic samplers. `grad`: None
    (plain autograd), "exact" (recomputed autograd, input gradient only) or "adjoint"; a caller
    that checked plain_graph_fits passes None for the same gradient without recomputation.
    states=True returns (x at 0, states, times): the state after every step (n, *x.shape),
    differentiable in the same gradient mode (DiffAttack's intermediate states), and the float64
    times they sit at (n,)."""
    if grad not in GRADS:
        raise SdepureError(f"unknown gradient mode {grad!r} for the solver")
    m = sampler.method
    if m in SDE_METHODS:
        out = reverse_sde(model, x, t_start, sampler.steps, noise, m, grad=grad,
                          adjoint_method=sampler.adjoint_method, states=states)
    elif m in ODE_METHODS:
        out = reverse_ode(model, x, t_start, sampler.steps, m, grad=grad, states=states)
    elif grad == "adjoint":
        raise SdepureError(f"the {m} sampler has no adjoint; use grad exact, or an SDE/ODE solver")
    elif m == "ddpm":
        out = ddpm_ancestral(model, x, t_start, sampler.steps, noise, sampler.clip_x0, grad=grad,
                             variance=sampler.variance, states=states)
    elif m == "ddim":
        out = ddim(model, x, t_start, sampler.steps, noise, sampler.eta, sampler.clip_x0, grad=grad, states=states)
    else:
        out = dpm_solver_2m(model, x, t_start, sampler.steps, sampler.clip_x0, grad=grad, states=states)
    return (*out, sampler.times(model.schedule, t_start)) if states else out
