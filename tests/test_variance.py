"""DensePure's ddpm steps with a learned-variance (learn_sigma) model: the step variance is the
network's own interpolation between beta and beta~ on the respaced chain (Nichol & Dhariwal 2021,
eq. 15), checked against that formula written out here in improved-diffusion's ascending-index
form, on a tiny ADM of the published CIFAR-10 layout."""
import math

import pytest
import torch
from torch import nn

from sdepure.brownian import Streams
from sdepure.defense import Defense
from sdepure.errors import SdepureError
from sdepure.models.adm import ADMUNet, adm_eps_model
from sdepure.models.base import EpsNetModel
from sdepure.rng import derive_seed
from sdepure.schedules import DiscreteVP
from sdepure.settings import Purifier
from sdepure.solvers import Sampler, solve

from test_adm import randomized, tiny_config

PRESET = "improved-cifar10-uncond"  # cosine T = 4000, learned sigma, time input i * 1000 / T


@pytest.fixture(scope="module")
def adm():
    net = randomized(ADMUNet(**tiny_config(PRESET)), seed=3)
    return net, adm_eps_model(net, PRESET)


def _increment(shape, seed, k):
    """Increment k of the CPU stream addressed by seed (float32, as sdepure draws it)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, k)), dtype=torch.float32)


def _paper_sampler(net, schedule: DiscreteVP, indices, x, seed):
    """Ancestral sampling on the respaced chain of table indices `indices` (ascending), written from
    Nichol & Dhariwal (2021): betas re-derived from alpha_bar on the kept steps; the model's variance
    channels v give log Sigma = f log beta_i + (1 - f) log beta~_i, f = (v + 1) / 2 (eq. 15), with
    log beta~ clipped at i = 0 (where beta~ = 0) to its value at i = 1, which no step uses since the
    last step adds no noise; mean = the posterior mean of the clipped x0 prediction (eq. 11-12)."""
    ab = [float(schedule.alpha_bars[i]) for i in indices]
    ab_prev = [1.0] + ab[:-1]
    beta = [1 - a / p for a, p in zip(ab, ab_prev)]
    post = [b * (1 - p) / (1 - a) for b, a, p in zip(beta, ab, ab_prev)]
    log_post = [math.log(post[1])] + [math.log(v) for v in post[1:]]
    c = x.shape[1]
    for step, i in enumerate(reversed(range(len(indices)))):
        t_in = torch.full((x.shape[0],), indices[i] * 1000.0 / schedule.T)  # rescale_timesteps
        out = net(x, t_in)
        eps, v = out[:, :c], out[:, c:]
        x0 = ((x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])).clamp(-1, 1)
        mean = (beta[i] * math.sqrt(ab_prev[i]) / (1 - ab[i])) * x0 \
            + ((1 - ab_prev[i]) * math.sqrt(1 - beta[i]) / (1 - ab[i])) * x
        if i == 0:
            return mean
        f = (v + 1) / 2
        log_var = f * math.log(beta[i]) + (1 - f) * log_post[i]
        x = mean + torch.exp(0.5 * log_var) * _increment(x.shape, seed, step)


@pytest.mark.parametrize("steps", [2, 5])
def test_learned_variance_follows_the_paper_on_the_respaced_chain(adm, steps):
    net, model = adm
    schedule = model.schedule
    t_star = schedule.t_star(0.5, "nearest")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    i_star = schedule.t_index_star(0.5, "nearest")
    indices = sorted({round(i_star - j * i_star / steps) for j in range(steps)})  # DensePure's subsequence
    with torch.no_grad():
        expected = _paper_sampler(net, schedule, indices, x, seed=11)
        out = solve(model, x, t_star, Sampler("ddpm", steps, variance="learned"), 11)
        posterior = solve(model, x, t_star, Sampler("ddpm", steps), 11)
    assert torch.allclose(out, expected, atol=1e-5), float((out - expected).abs().max())
    # it matters: the fixed posterior variance gives another sample
    assert float((out - posterior).abs().max()) > 1e-3


class _Stub(nn.Module):
    """eps = x / 4 and the variance channels fixed at v: f = 0 is beta~, f = 1 is beta."""

    def __init__(self, v: float):
        super().__init__()
        self.v, self.calls = v, 0

    def forward(self, x, t):
        self.calls += 1
        return torch.cat([x / 4, torch.full_like(x, self.v)], 1)


@pytest.mark.parametrize("v,fixed", [(-1.0, "posterior"), (1.0, "beta")])
def test_learned_variance_ends_are_the_fixed_variances(v, fixed):
    """v = -1 gives the posterior variance, v = 1 beta (eq. 15's ends), from one network call per
    step: the variance comes with eps."""
    schedule = DiscreteVP.cosine(400)
    stub = _Stub(v)
    model = EpsNetModel(stub, schedule, time_input="index-rescaled", learned_sigma=True)
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    t_star = schedule.t_star(0.5, "nearest")
    learned = solve(model, x, t_star, Sampler("ddpm", 6, variance="learned"), 5)
    assert stub.calls == 6
    assert torch.allclose(learned, solve(model, x, t_star, Sampler("ddpm", 6, variance=fixed), 5), atol=1e-12)
    other = "beta" if fixed == "posterior" else "posterior"
    assert not torch.allclose(learned, solve(model, x, t_star, Sampler("ddpm", 6, variance=other), 5))


def test_auto_variance_is_learned_for_ddpm_with_a_variance_output(adm):
    _, model = adm
    classifier = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))

    def variance(**kwargs):
        settings = Purifier(**{"method": "densepure", "sigma": 0.5, "votes": 2, "steps": 3, **kwargs})
        return Defense(settings, model, classifier, 10).sampler.variance

    assert variance(solver="ddpm") == "learned"
    assert variance(solver="ddpm", variance="posterior") == "posterior"
    assert variance(solver="euler") is None  # auto: nothing to choose, the SDE's noise is fixed by beta(t)
    assert variance(solver="ddim", eta=1.0) is None
    plain = EpsNetModel(_Stub(0.0), DiscreteVP.cosine(400), "index-rescaled")
    assert Defense(Purifier("densepure", sigma=0.5, votes=2, steps=3, solver="ddpm"), plain, classifier,
                   10).sampler.variance == "posterior"
    with pytest.raises(SdepureError, match="no variance output|has none"):
        Defense(Purifier("densepure", sigma=0.5, votes=2, steps=3, solver="ddpm", variance="learned"), plain,
                classifier, 10)


def test_defense_runs_the_learned_variance(adm):
    """Through the Defense, a densepure vote on the tiny ADM uses the learned variance by default:
    its runs equal plain solves with variance learned."""
    net, model = adm
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    torch.manual_seed(0)
    defense = Defense(Purifier("densepure", sigma=0.5, votes=2, steps=3, solver="ddpm", rng="cpu"), model,
                      classifier, 10)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = defense.run_logits(x, Streams.batch(4, 2), [1])[0]
        plain = solve(model, defense.x_t_star(x), defense.t_star, Sampler("ddpm", 3, variance="learned"),
                      derive_seed(4, 1))
    assert torch.allclose(logits, classifier((plain.clamp(-1, 1) + 1) / 2), atol=1e-6)
