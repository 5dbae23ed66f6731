"""Slices of input space and the smoothed classifier's decision map on them (sdepure.regions)."""
import pytest
import torch

from sdepure import regions
from sdepure.defense import Defense
from sdepure.errors import SdepureError
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.rng import derive_seed
from sdepure.schedules import LinearVP
from sdepure.settings import Purifier
from sdepure.smoothing import ABSTAIN, Smooth

from helpers import MEANS, NearestMean


def test_slice_plane_is_orthonormal_and_seeded():
    x = torch.rand(1, 6, 6, dtype=torch.float64)
    d = torch.randn(1, 6, 6, dtype=torch.float64)
    u, v = regions.slice_plane(x, d, seed=3)
    assert torch.allclose(u, d / d.norm()) and abs(float(v.norm()) - 1) < 1e-12 and abs(float((u * v).sum())) < 1e-12
    assert torch.equal(v, regions.slice_plane(x, d, seed=3)[1]) and not torch.equal(v, regions.slice_plane(x, d, 4)[1])


def test_grid_spans_the_plane_row_major():
    x = torch.zeros(2, dtype=torch.float64)
    u, v = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    points, t = regions.grid(x, u, v, 1.0, 3)
    assert t.tolist() == [-1.0, 0.0, 1.0]
    assert points.tolist() == [[a, b] for b in (-1.0, 0.0, 1.0) for a in (-1.0, 0.0, 1.0)]


@pytest.mark.parametrize("case,needle", [("shape", "has shape"), ("zero", "zero length"), ("one point", "at least 2"),
                                         ("extent", "extent must be > 0")])
def test_bad_input_is_one_clear_error(case, needle):
    x = torch.rand(1, 4, 4)
    with pytest.raises(SdepureError, match=needle):
        if case == "shape":
            regions.slice_plane(x, torch.ones(1, 4, 5), 0)
        elif case == "zero":
            regions.slice_plane(x, torch.zeros(1, 4, 4), 0)
        else:
            u, v = regions.slice_plane(x, torch.ones(1, 4, 4), 0)
            regions.grid(x, u, v, 0.5 if case == "one point" else 0.0, 1 if case == "one point" else 5)


def test_decision_map_equals_predict_point_by_point():
    """On the Gaussian-mixture defense: the batched map's label at every grid point is PREDICT's
    on that point alone with its own seed; the map holds more than one class and abstentions."""
    model = GaussianMixtureModel(GaussianMixture(MEANS, [0.08] * 3), LinearVP())
    defense = Defense(Purifier("densepure", sigma=0.08, votes=3, steps=4, solver="euler"), model, NearestMean(MEANS), 3)
    smooth = Smooth(defense.predict, 3, 0.08)
    centers = (torch.tensor(MEANS, dtype=torch.float64) + 1) / 2
    x = centers[0]
    u, v = regions.slice_plane(x, centers[1] - centers[0], seed=1)
    labels = regions.decision_map(smooth, x, u, v, 0.4, 5, 20, 0.01, 10, seed=7, rows=60)
    points, _ = regions.grid(x, u, v, 0.4, 5)
    alone = [smooth.predict(points[i], 20, 0.01, 10, derive_seed(7, i)) for i in range(len(points))]
    assert labels.flatten().tolist() == alone
    assert {0, 1} <= set(alone) and ABSTAIN in alone, alone
