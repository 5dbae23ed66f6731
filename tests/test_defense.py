"""The defense (sdepure.defense.Defense) against the Gaussian-mixture oracle, its vote's tie rule,
its refusals, and DensePure's learned variance against the formula of Nichol & Dhariwal."""
import math

import pytest
import torch

from sdepure import defense as defense_mod
from sdepure.brownian import GridBrownian, Streams
from sdepure.defense import Defense
from sdepure.errors import SdepureError
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import LinearVP
from sdepure.settings import Purifier

from helpers import MEANS, NearestMean


@pytest.fixture
def small_gmm():
    return GaussianMixtureModel(GaussianMixture(MEANS, [0.08] * 3, weights=[0.4, 0.35, 0.25]), LinearVP())


def test_majority_vote_tie_rule():
    labels = torch.tensor([[1, 2, 2, 1], [3, 3, 1, 0], [4, 4, 4, 4], [9, 0, 9, 0]])
    assert defense_mod.majority_vote(labels, 10).tolist() == [1, 3, 4, 0]


def test_carlini_is_posterior_mean(small_gmm):
    """The one-shot x0 prediction is Tweedie's posterior mean E[x0 | x_t]."""
    sigma = 0.25
    t_star = defense_mod.t_star_for(small_gmm.schedule, sigma, "carlini")
    x_noisy01 = torch.tensor([[0.7, 0.55], [0.3, 0.5], [0.52, 0.8]], dtype=torch.float64)
    carlini = Defense(Purifier("carlini", sigma=sigma), small_gmm, NearestMean(MEANS), 3)
    assert carlini.t_star == t_star
    out = carlini.purify(x_noisy01, Streams.batch(0, 3))
    a = float(small_gmm.schedule.alpha_bar(t_star))
    w, m, _ = small_gmm.posterior(a ** 0.5 * (2 * x_noisy01 - 1), t_star)
    expected = ((w[..., None] * m).sum(1).clamp(-1, 1) + 1) / 2
    assert torch.allclose(out, expected, atol=1e-10)


def test_diffpure_labels_follow_posterior_and_densepure_takes_the_mode(small_gmm):
    """Single reverse runs are labelled with the posterior component probabilities (within 0.04 at
    n = 2000); a 41-vote DensePure returns the component with the largest posterior mass."""
    sigma = 0.5
    classifier = NearestMean(MEANS)
    x01 = torch.tensor([[0.55, 0.55]], dtype=torch.float64)
    t_star = defense_mod.t_star_for(small_gmm.schedule, sigma, "diffpure")
    a = float(small_gmm.schedule.alpha_bar(t_star))
    w, _, _ = small_gmm.posterior(a ** 0.5 * (2 * x01 - 1), t_star)
    single = Defense(Purifier("diffpure", sigma=sigma, steps=200, solver="euler"), small_gmm, classifier, 3)
    labels = single.predict(x01.expand(2000, 2).clone(), 4)
    freq = torch.bincount(labels, minlength=3).double() / 2000
    assert torch.allclose(freq, w[0], atol=0.04), (freq, w)
    dense = Defense(Purifier("densepure", sigma=sigma, votes=41, steps=200, solver="euler"), small_gmm, classifier, 3)
    votes = dense.predict(x01.expand(50, 2).clone(), 5)
    mode = int(w[0].argmax())
    assert (votes == mode).double().mean() > (freq[mode] + 0.05)  # voting concentrates on the mode


def test_none_is_identity():
    classifier = NearestMean(MEANS)
    base = Defense(Purifier("none", sigma=0.5), None, classifier, 3)
    x = torch.tensor([[0.8, 0.5], [0.2, 0.5]], dtype=torch.float64)
    assert base.predict(x, 0).tolist() == [0, 1]


def test_build_errors(small_gmm):
    classifier = NearestMean(MEANS)
    with pytest.raises(SdepureError):
        Defense(Purifier("diffusepure", sigma=0.5), small_gmm, classifier, 3)
    with pytest.raises(SdepureError):
        Defense(Purifier("carlini", sigma=0.5, votes=5), small_gmm, classifier, 3)
    with pytest.raises(SdepureError):
        Defense(Purifier("densepure", sigma=0.5, votes=0), small_gmm, classifier, 3)
    with pytest.raises(SdepureError):
        Defense(Purifier("densepure", sigma=0.5, steps=0), small_gmm, classifier, 3)
    with pytest.raises(SdepureError):
        Defense(Purifier("diffpure", sigma=0.5), None, classifier, 3)
    with pytest.raises(SdepureError):
        Defense(Purifier("diffpure", sigma=-0.5), small_gmm, classifier, 3)
