import numpy as np
import pytest
import torch
from scipy.stats import norm

from sdepure.errors import SdepureError
from sdepure.rng import derive_seed, generator
from sdepure.smoothing import ABSTAIN, Smooth, lower_confidence_bound


def bernoulli_base(p_a: float, label: int = 3, other: int = 5):
    """A synthetic base classifier: `label` with probability p_a, else `other`, seeded."""
    def base(x, seed):
        u = torch.rand(x.shape[0], generator=generator(seed))
        return torch.where(u < p_a, torch.tensor(label), torch.tensor(other))
    return base


def test_clopper_pearson_covers_true_p():
    """Over 2000 seeded binomial trials the lower bound is <= p in at least a (1 - alpha) share,
    within 3 binomial standard errors (alpha = 0.1: share >= 0.9 - 0.02)."""
    rng = np.random.default_rng(0)
    alpha, n = 0.1, 200
    for p in (0.55, 0.8, 0.97):
        trials = rng.binomial(n, p, size=2000)
        covered = np.mean([lower_confidence_bound(int(k), n, alpha) <= p for k in trials])
        assert covered >= 1 - alpha - 3 * np.sqrt(alpha * (1 - alpha) / 2000)


def test_certify_bound_covers_synthetic_pa():
    """End to end through Smooth.certify: the implied pA_lower stays below the true pA."""
    p_a, sigma, alpha, n = 0.8, 0.5, 0.1, 100
    smooth = Smooth(bernoulli_base(p_a), num_classes=10, sigma=sigma)
    x = torch.zeros(4)
    below, trials = 0, 300
    for i in range(trials):
        pred, radius, info = smooth.certify(x, n0=10, n=n, alpha=alpha, batch=37, seed=derive_seed(1, i))
        below += info["p_a_lower"] <= p_a
        if pred != ABSTAIN:
            assert radius == pytest.approx(sigma * norm.ppf(info["p_a_lower"]))
    assert below / trials >= 1 - alpha - 3 * np.sqrt(alpha * (1 - alpha) / trials)


def test_radius_and_abstain_hand_computed():
    # all n draws agree: Clopper-Pearson lower bound is alpha^(1/n)
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    smooth = Smooth(bernoulli_base(1.0, label=7), num_classes=10, sigma=0.25)
    pred, radius, info = smooth.certify(torch.zeros(3), n0=5, n=100, alpha=0.001, batch=64, seed=0)
    assert pred == 7 and info["n_a"] == 100
    assert radius == pytest.approx(0.25 * norm.ppf(0.001 ** 0.01), rel=1e-9)  # alpha^(1/n) = 0.93325
    assert radius == pytest.approx(0.37512, abs=1e-4)  # Phi^-1(0.93325) = 1.50047
    # a coin flip between two labels cannot be certified: abstain with radius 0
    pred, radius, info = Smooth(bernoulli_base(0.5), 10, 0.5).certify(torch.zeros(3), 20, 200, 0.001, 50, seed=1)
    assert pred == ABSTAIN and radius == 0.0 and info["p_a_lower"] < 0.5


def test_predict():
    assert Smooth(bernoulli_base(1.0, label=2), 10, 0.5).predict(torch.zeros(2), 50, 0.001, 16, seed=0) == 2
    assert Smooth(bernoulli_base(0.5), 10, 0.5).predict(torch.zeros(2), 100, 0.001, 16, seed=0) == ABSTAIN


def test_noise_has_sigma_and_results_are_seeded():
    seen = []

    def base(x, seed):
        seen.append(x.clone())
        return torch.zeros(x.shape[0], dtype=torch.long)

    smooth = Smooth(base, 10, sigma=0.7)
    counts = smooth.sample_counts(torch.full((500,), 2.0), num=64, batch=64, seed=3)
    assert counts[0] == 64
    noise = seen[0] - 2.0
    assert abs(float(noise.std()) - 0.7) < 0.01  # 32,000 draws: SE of the std ~ 0.003
    smooth.sample_counts(torch.full((500,), 2.0), num=64, batch=64, seed=3)
    assert torch.equal(seen[0], seen[1])


def test_bad_parameters():
    smooth = Smooth(bernoulli_base(1.0), 10, 0.5)
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.0}, {"n0": 0}, {"n": 0}, {"batch": 0}):
        args = {"n0": 10, "n": 10, "alpha": 0.01, "batch": 4, "seed": 0, **kwargs}
        with pytest.raises(SdepureError):
            smooth.certify(torch.zeros(2), **args)
    with pytest.raises(SdepureError):
        Smooth(bernoulli_base(1.0), 10, 0.0)


def test_smoothing_noise_streams():
    """rng="cpu" noise is the CPU stream drawn as before (generator seeded derive_seed(seed, b, 0));
    rng="device" on the CPU is the same stream; an unknown rng is refused."""
    seen = {}

    def base(noisy, seed):
        seen.setdefault("x", []).append(noisy.clone())
        return torch.zeros(noisy.shape[0], dtype=torch.long)

    x = torch.zeros(3)
    for rng in ("cpu", "device"):
        seen.clear()
        Smooth(base, 4, 0.5, rng=rng).sample_counts(x, 5, 5, seed=7)
        expected = 0.5 * torch.randn((5, 3), generator=torch.Generator().manual_seed(derive_seed(7, 0, 0)))
        assert torch.equal(seen["x"][0], expected)
    with pytest.raises(SdepureError, match="rng"):
        Smooth(base, 4, 0.5, rng="tpu")


def test_iss_sample_size_is_the_fewest_draws_within_the_tolerance():
    """The chosen n certifies within tol of the cap's radius at p_hat, n - 1 does not; nothing is
    drawn where even the cap abstains; a tighter tolerance never takes fewer draws."""
    from sdepure.smoothing import iss_sample_size, lower_confidence_bound, radius_of

    def radius(p, n):
        return radius_of(lower_confidence_bound(p * n, n, 0.001), 0.5)
    for p in (0.55, 0.7, 0.9, 0.99, 1.0):
        n = iss_sample_size(p, 10000, 0.001, 0.5, 0.05)
        full = radius(p, 10000)
        assert 1 <= n <= 10000 and radius(p, n) is not None and full - radius(p, n) <= 0.05
        if n > 1:
            r = radius(p, n - 1)
            assert r is None or full - r > 0.05
        assert iss_sample_size(p, 10000, 0.001, 0.5, 0.01) >= n
    assert iss_sample_size(0.5, 10000, 0.001, 0.5, 0.05) == 0 and iss_sample_size(0.3, 400, 0.001, 0.5, 0.05) == 0


def test_sequential_checkpoints_double_from_one_batch_to_the_cap():
    from sdepure.smoothing import checkpoints
    assert checkpoints(400, 100) == [100, 200, 400]
    assert checkpoints(1000, 100) == [100, 200, 400, 800, 1000]
    assert checkpoints(100, 100) == [100]
    with pytest.raises(SdepureError, match="first checkpoint"):
        checkpoints(50, 100)
