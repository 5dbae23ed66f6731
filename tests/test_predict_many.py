"""Batched PREDICT (many inputs' noisy copies in one call of the defense) gives each input the
label PREDICT gives it alone, with fewer calls."""
import pytest
import torch

from sdepure.defense import Defense
from sdepure.errors import SdepureError
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import LinearVP
from sdepure.settings import Purifier
from sdepure.smoothing import ABSTAIN, Smooth

from helpers import MEANS, NearestMean


@pytest.mark.parametrize("method,votes", [("densepure", 3), ("diffpure", 1)])
def test_predict_many_equals_predict_one_by_one(method, votes):
    model = GaussianMixtureModel(GaussianMixture(MEANS, [0.08] * 3), LinearVP())
    defense = Defense(Purifier(method, sigma=0.08, votes=votes, steps=4, solver="euler"), model, NearestMean(MEANS), 3)
    calls = []
    smooth = Smooth(lambda x, address: calls.append(x.shape[0]) or defense.predict(x, address), 3, 0.08)
    centers = (torch.tensor(MEANS, dtype=torch.float64) + 1) / 2
    # points near the means (clear labels) and between them (abstentions)
    xs = torch.cat([centers, (centers[0] + centers[1]) / 2 + torch.zeros(2, 2, dtype=torch.float64),
                    centers + 0.05])
    seeds = list(range(10, 10 + len(xs)))
    one = [smooth.predict(xs[p], 30, 0.01, 8, seeds[p]) for p in range(len(xs))]
    calls_one = len(calls)
    calls.clear()
    many = smooth.predict_many(xs, 30, 0.01, 8, seeds, rows=24)
    assert many == one and ABSTAIN in one and len(set(one)) > 2, one
    assert max(calls) <= 24 and len(calls) < calls_one / 2, (len(calls), calls_one)
    # the same draws, not just the same decisions: every input's label counts agree exactly
    counts = smooth.counts_many(xs, 30, 8, seeds, rows=24)
    for p in range(len(xs)):
        assert (counts[p] == smooth.sample_counts(xs[p], 30, 8, seeds[p])).all(), p


def test_predict_many_refuses_mismatched_seeds():
    smooth = Smooth(lambda x, address: torch.zeros(x.shape[0], dtype=torch.long), 3, 0.3)
    with pytest.raises(SdepureError, match="one seed each"):
        smooth.predict_many(torch.zeros(4, 2), 10, 0.01, 5, [1, 2])
