import math

import pytest
import torch

from sdepure.brownian import GridBrownian
from sdepure.errors import SdepureError
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import DiscreteVP, LinearVP
from sdepure.solvers import ddpm_times, solve


def test_grid_brownian_seeded_and_reversible():
    a = GridBrownian(7, (3, 5), dtype=torch.float64)
    b = GridBrownian(7, (3, 5), dtype=torch.float64)
    c = GridBrownian(8, (3, 5), dtype=torch.float64)
    assert torch.equal(a(0, 1), b(0, 1))
    assert not torch.equal(a(0, 1), c(0, 1))
    # queries in any order give the same increments; intervals add up; reverse is the negative
    assert torch.allclose(a(0, 3), a(0, 1) + a(1, 2) + a(2, 3))
    assert torch.equal(a(5, 2), -a(2, 5))
    with pytest.raises(SdepureError):
        a(0.5, 1.0)
    with pytest.raises(SdepureError):
        a(0, 1, return_U=True)


def test_grid_brownian_increments_standard_normal():
    bm = GridBrownian(0, (20000,), dtype=torch.float64)
    z = torch.cat([bm(k, k + 1) for k in range(5)])
    # mean 0 +- 4 SE, variance 1 +- 4 SE (fixed seed)
    assert abs(float(z.mean())) < 4 / math.sqrt(len(z))
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / len(z))


def _manual_euler(model, x, t_start, steps, seed):
    """Euler-Maruyama in physical time with the same increments, written out by hand."""
    grid = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)
    bm = GridBrownian(seed, x.shape, dtype=x.dtype)
    for k in range(steps):
        t, h = float(grid[k]), float(grid[k] - grid[k + 1])
        beta = float(model.schedule.beta(t))
        score = model.score(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        x = x + h * (0.5 * beta * x + beta * score) + math.sqrt(beta * h) * bm.increment(k)
    return x


def test_torchsde_solve_equals_hand_written_euler(gmm_model):
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = solve(gmm_model, x, 0.3, 37, seed=5, method="euler")
    ref = _manual_euler(gmm_model, x, 0.3, 37, seed=5)
    assert torch.allclose(out, ref, atol=1e-12)


def test_same_seed_same_output_different_seed_differs(gmm_model):
    x = torch.zeros(16, 2, dtype=torch.float64)
    for method in ("euler", "reversible_heun", "ddpm"):
        a = solve(gmm_model, x, 0.25, 20, seed=1, method=method, clip_x0=False)
        b = solve(gmm_model, x, 0.25, 20, seed=1, method=method, clip_x0=False)
        c = solve(gmm_model, x, 0.25, 20, seed=2, method=method, clip_x0=False)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("method,steps", [("euler", 500), ("reversible_heun", 200), ("ddpm", 200)])
def test_reverse_sde_samples_exact_posterior(gmm_model, method, steps):
    """From a fixed x_t*, the reverse process must sample p(x0 | x_t*) (a Gaussian mixture).
    Tolerances: mixture weights within 0.03 (binomial SE at n=4000 is <= 0.008), component
    means within 0.03, per-coordinate spread within 10% of the exact posterior std."""
    t_star = gmm_model.schedule.t_star(0.5)
    x_t = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    w, m, c = gmm_model.posterior(x_t, t_star)
    n = 4000
    y = solve(gmm_model, x_t.expand(n, 2).clone(), t_star, steps, seed=11, method=method, clip_x0=False)
    comp = torch.cdist(y, m[0]).argmin(1)
    share = torch.bincount(comp, minlength=3).double() / n
    assert torch.allclose(share, w[0], atol=0.03), (share, w)
    for k in range(3):
        sel = y[comp == k]
        assert torch.allclose(sel.mean(0), m[0, k], atol=0.03)
        assert float(sel.std(0).mean()) == pytest.approx(math.sqrt(float(c[0, k])), rel=0.1)


def test_probability_flow_ode_single_gaussian_closed_form():
    """For N(mu, s^2 I) the PF-ODE is linear: x0 = mu + s / sqrt(v_t) (x_t - sqrt(a) mu)."""
    mu, s = torch.tensor([[0.5, -0.3]], dtype=torch.float64), 0.2
    model = GaussianMixtureModel(GaussianMixture(mu, [s]), LinearVP())
    t = 0.3
    a = float(model.schedule.alpha_bar(t))
    x_t = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = mu + s / math.sqrt(a * s * s + 1 - a) * (x_t - math.sqrt(a) * mu)
    out = solve(model, x_t, t, 200, seed=0, method="ode-rk4")
    assert torch.allclose(out, exact, atol=1e-6)
    assert torch.allclose(solve(model, x_t, t, 1, seed=0, method="ode-dopri5"), exact, atol=1e-4)


def test_ddpm_subsequence_follows_densepure_rule():
    s = DiscreteVP.linear(1000)
    times = ddpm_times(s, float(s.time_of_index(259)), 10)
    idx = [round(float(t) * 1000 - 1) for t in times[:-1]]
    assert idx == [round(259 - j * 259 / 10) for j in range(10)]
    assert float(times[-1]) == 0.0
    cont = ddpm_times(LinearVP(), 0.3, 4)
    assert torch.allclose(cont, torch.tensor([0.3, 0.225, 0.15, 0.075, 0.0], dtype=torch.float64))


def test_bad_solver_and_steps(gmm_model):
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(SdepureError):
        solve(gmm_model, x, 0.3, 10, seed=0, method="srk")
    with pytest.raises(SdepureError):
        solve(gmm_model, x, 0.3, 0, seed=0, method="euler")


class _CountingModel:
    """Counts network (score) calls of a wrapped model."""

    def __init__(self, model):
        self.model, self.schedule, self.calls = model, model.schedule, 0

    def score(self, x, t):
        self.calls += 1
        return self.model.score(x, t)


@pytest.mark.parametrize("method,steps", [("euler", 37), ("midpoint", 16), ("reversible_heun", 20),
                                          ("ode-rk4", 30)])
def test_exact_gradient_in_segments_equals_plain_backprop(gmm_model, method, steps, monkeypatch):
    """grad="exact" solves in checkpointed segments above SEGMENT_FROM steps: same output as the
    plain solve, same input gradient as backprop through every step (float64, 1e-12).
    reversible_heun is never cut (its second state would restart) and recomputes each call once."""
    from sdepure import solvers

    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(grad):
        xi = x.clone().requires_grad_(True)
        counting = _CountingModel(gmm_model)
        out = solvers.solve(counting, xi, 0.3, steps, seed=9, method=method, grad=grad)
        forward_calls = counting.calls
        (out * weights).sum().backward()
        return out.detach(), xi.grad, forward_calls, counting.calls

    plain_out, plain_grad, plain_calls, _ = run(None)
    out, grad, calls, total = run("exact")
    assert steps >= solvers.SEGMENT_FROM
    assert torch.allclose(out, plain_out, atol=1e-12) and torch.allclose(grad, plain_grad, atol=1e-12)
    # the memo spares the shape-check call at each segment's start: forward costs what the plain
    # solve costs, and backward recomputes each segment, then each network call inside it
    assert calls == plain_calls
    assert total == (2 if method == "reversible_heun" else 3) * plain_calls
    monkeypatch.setattr(solvers, "SEGMENT_FROM", 10**9)  # per-call checkpoints only
    flat_out, flat_grad, _, flat_total = run("exact")
    assert torch.allclose(flat_grad, grad, atol=1e-12) and flat_total == 2 * plain_calls
