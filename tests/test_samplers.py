"""DDIM and DPM-Solver++(2M) against exact references on the Gaussian-mixture oracle."""
import math

import pytest
import torch

from sdepure import solvers
from sdepure.errors import SdepureError
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import DiscreteVP, LinearVP

from helpers import single_gaussian_pf_case

MIXTURE = dict(means=[[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], stds=[0.3, 0.3, 0.3], weights=[0.5, 0.3, 0.2])


def _model(schedule):
    return GaussianMixtureModel(GaussianMixture(**MIXTURE), schedule)


def _x_t(model, t, n=256, seed=0):
    """Samples of p_t: forward-diffused mixture samples."""
    gen = torch.Generator().manual_seed(seed)
    x0, _ = model.mixture.sample(n, gen)
    a = float(model.schedule.alpha_bar(t))
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _rms(a, b):
    return float(((a - b) ** 2).sum(1).mean().sqrt())


def _slope(steps, errors):
    """Least-squares slope of -log(error) against log(steps): the observed order."""
    x = torch.tensor([math.log(s) for s in steps], dtype=torch.float64)
    y = torch.tensor([-math.log(e) for e in errors], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


@pytest.mark.parametrize("schedule", [LinearVP(), DiscreteVP.linear(1000)], ids=["continuous", "table"])
def test_deterministic_samplers_converge_to_the_pf_ode_map_at_their_order(schedule):
    """From t* (sigma 0.5) to t_end = 0.05 the probability-flow map is deterministic; the
    reference is ode-rk4 with 1000 steps (within 1e-5 of 500 steps; beta has kinks on a table). DDIM (eta = 0) is
    first order in the step, DPM-Solver++(2M) second order: observed slopes over 20..160 steps
    within [0.85, 1.3] and [1.6, 2.4]; DPM-Solver++ is at least 5x closer at 80 steps."""
    model = _model(schedule)
    t_star, t_end = float(schedule.t_star(0.5)), 0.05
    x = _x_t(model, t_star, n=128)
    ref = solvers.reverse_ode(model, x, t_star, 1000, "ode-rk4", t_end=t_end)
    coarse = solvers.reverse_ode(model, x, t_star, 500, "ode-rk4", t_end=t_end)
    assert _rms(coarse, ref) < 1e-5
    steps = (20, 40, 80, 160)
    errors = {"ddim": [], "dpm": []}
    for n in steps:
        times = torch.linspace(t_star, t_end, n + 1, dtype=torch.float64)
        errors["ddim"].append(_rms(solvers.ddim(model, x, t_star, n, clip_x0=False, times=times), ref))
        errors["dpm"].append(_rms(solvers.dpm_solver_2m(model, x, t_star, n, clip_x0=False, times=times), ref))
    assert all(a > b for a, b in zip(errors["ddim"], errors["ddim"][1:]))
    assert all(a > b for a, b in zip(errors["dpm"], errors["dpm"][1:]))
    assert 0.85 <= _slope(steps, errors["ddim"]) <= 1.3, errors
    assert 1.6 <= _slope(steps, errors["dpm"]) <= 2.4, errors
    assert errors["dpm"][2] * 5 < errors["ddim"][2]


def test_single_gaussian_closed_form_through_solve():
    """For N(mu, s^2 I) the PF-ODE map to t = 0 is affine: x0 = mu + s / sqrt(v_t) (x_t - sqrt(a) mu).
    solve(..., "ddim") and "dpm-solver-2m" on the ddpm subsequence approach it as steps grow
    (the last step to t = 0 is the x0 prediction)."""
    model, t, x_t, exact = single_gaussian_pf_case()
    for method, bound in (("ddim", 1e-2), ("dpm-solver-2m", 1e-3)):
        errors = [_rms(solvers.solve(model, x_t, t, solvers.Sampler(method, n, clip_x0=False)), exact) for n in (5, 20, 80)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < bound, (method, errors)


@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("schedule", [LinearVP(), DiscreteVP.linear(1000)], ids=["continuous", "table"])
def test_ddim_eta_one_is_ddpm_step_for_step(schedule, clip_x0):
    """DDIM with eta = 1 has DDPM's posterior variance and mean; on the same subsequence with the
    same GridBrownian increments the two chains agree to rounding (float64)."""
    model = _model(schedule)
    t_star = float(schedule.t_star(0.5))
    x = 0.5 * _x_t(model, t_star, n=64)  # inside [-1, 1] mostly, so clipping matters for some rows
    for steps in (1, 3, 10):
        a = solvers.solve(model, x, t_star, solvers.Sampler("ddpm", steps, clip_x0=clip_x0), 4)
        b = solvers.solve(model, x, t_star, solvers.Sampler("ddim", steps, 1.0, clip_x0=clip_x0), 4)
        assert torch.allclose(a, b, atol=1e-10), steps


def test_ddim_eta_zero_is_deterministic_and_eta_in_between_is_random(gmm_model):
    x = torch.zeros(8, 2, dtype=torch.float64)
    a = solvers.solve(gmm_model, x, 0.3, solvers.Sampler("ddim", 6, clip_x0=False))
    b = solvers.solve(gmm_model, x, 0.3, solvers.Sampler("ddim", 6, clip_x0=False))
    assert torch.equal(a, b)
    c = solvers.solve(gmm_model, x, 0.3, solvers.Sampler("ddim", 6, 0.5, clip_x0=False), 1)
    d = solvers.solve(gmm_model, x, 0.3, solvers.Sampler("ddim", 6, 0.5, clip_x0=False), 2)
    assert not torch.allclose(c, d)


class _Times(GaussianMixtureModel):
    def __init__(self, mixture, schedule):
        super().__init__(mixture, schedule)
        self.times = []

    def eps(self, x, t):
        self.times.append(float(t[0]))
        return super().eps(x, t)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm-solver-2m"])
def test_subsequence_samplers_call_the_model_at_its_own_timesteps(method):
    """On a table the network is called once per step at the table times of ddpm_times."""
    schedule = DiscreteVP.linear(1000)
    model = _Times(GaussianMixture(**MIXTURE), schedule)
    t_star = float(schedule.time_of_index(259))
    solvers.solve(model, torch.zeros(2, 2, dtype=torch.float64), t_star, solvers.Sampler(method, 10), 0)
    expected = solvers.ddpm_times(schedule, t_star, 10)[:-1].tolist()
    assert model.times == pytest.approx(expected, abs=1e-12)
    assert [round(t * 1000 - 1) for t in model.times] == [round(259 - j * 25.9) for j in range(10)]


def test_sampler_refusals(gmm_model):
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(SdepureError, match="eta"):
        solvers.Sampler("ddim", 4, eta=1.5)
    with pytest.raises(SdepureError, match="eta"):
        solvers.Sampler("euler", 4, eta=0.5)
    for method in ("ddim", "dpm-solver-2m"):
        with pytest.raises(SdepureError, match="no adjoint"):
            solvers.solve(gmm_model, x, 0.3, solvers.Sampler(method, 4), 0, grad="adjoint")
