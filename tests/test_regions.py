"""Slices of input space and the smoothed classifier's decision map on them (sdepure.regions)."""
import pytest
from scipy.stats import binom
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


# -- the nearest change of a smoothed classifier, on a linear oracle ---------------------------
# g is the halfspace itself: x . w > b, so the exact distance to g's change is the margin
# |x . w - b| / |w|, reached along w.

D, SIGMA, ALPHA = 16, 0.5, 0.001


def linear_case(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    b = 0.3
    unit = w / w.norm()
    margins = (0.2 + 2.8 * torch.rand(count, generator=g, dtype=torch.float64)) * SIGMA
    margins *= torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    along = torch.randn(count, D, generator=g, dtype=torch.float64)
    along -= (along @ unit)[:, None] * unit
    x = along + (b / w.norm() + margins)[:, None] * unit

    def labels(batch, address):
        return (batch @ w > b).long()

    def logits(batch, address):  # a steep soft version of the same halfspace
        z = 10 * (batch @ unit - b / w.norm()) / SIGMA
        return torch.stack([torch.zeros_like(z), z], -1)

    return w, x, margins, Smooth(labels, 2, SIGMA), logits


def test_nearest_change_on_a_linear_classifier_finds_the_normal_and_bounds_the_margin():
    """50 inputs at margins 0.1 to 1.5 (the certified ones): the attack's direction is the normal (cosine > 0.999),
    every confirmed distance lies above the exact margin (a PREDICT of the other class inside it
    is one of the alpha-rare failures: at most the Binomial slack) and within 0.3 of it, and the
    certified radii lie below the margins and the confirmed distances."""
    w, x, margins, smooth, logits = linear_case(50)
    seeds = [derive_seed(5, i) for i in range(len(x))]
    certified = [smooth.certify(x[i], 64, 400, ALPHA, 400, derive_seed(6, i)) for i in range(len(x))]
    keep = [i for i, (c, _, _) in enumerate(certified) if c != ABSTAIN]
    assert len(keep) >= 45 and all(certified[i][0] == int(margins[i] > 0) for i in keep)
    x, margins, seeds = x[keep], margins[keep], [seeds[i] for i in keep]
    labels, radii = [certified[i][0] for i in keep], [certified[i][1] for i in keep]
    directions, rows = regions.nearest_change(smooth, logits, x, labels, seeds, max_radius=3.0, n=400,
                                              alpha=ALPHA, batch=400, steps=20, m=8, rounds=10)
    cosine = (directions @ (w / w.norm())).abs()
    assert float(cosine.min()) > 0.999, cosine.min()
    confirmed = [i for i, r in enumerate(rows) if r["status"] == "confirmed"]
    assert len(confirmed) >= 40, [r["status"] for r in rows]
    gap = torch.tensor([rows[i]["distance"] for i in confirmed], dtype=torch.float64) - margins[confirmed].abs()
    slack = int(binom.isf(1e-6, len(rows), ALPHA))  # over every searched input, not only the confirmed
    assert int((gap < 0).sum()) <= slack and float(gap.max()) < 0.3, gap
    summary = regions.against_diagonal(radii, rows, ALPHA, ALPHA)
    assert summary["checked"] == len(confirmed) and summary["above"] <= summary["allowed"], summary
    assert 0.5 < summary["median_ratio"] < 1, summary


def test_a_search_does_not_depend_on_the_other_inputs():
    w, x, margins, smooth, logits = linear_case(4, seed=1)
    labels = (margins > 0).long().tolist()
    seeds = [derive_seed(9, i) for i in range(4)]
    directions, rows = regions.nearest_change(smooth, logits, x, labels, seeds, 3.0, 100, ALPHA, 100, steps=5, m=4,
                                              rounds=4)
    one_dir, one = regions.nearest_change(smooth, logits, x[2:3], labels[2:3], seeds[2:3], 3.0, 100, ALPHA, 100,
                                          steps=5, m=4, rounds=4)
    assert torch.equal(one_dir[0], directions[2]) and one[0] == rows[2]


def test_no_change_within_the_search_radius_is_reported_as_such():
    """Along the hyperplane g never changes: every search ends at the search radius, unconfirmed."""
    w, x, margins, smooth, logits = linear_case(3, seed=2)
    unit = w / w.norm()
    parallel = torch.ones(D, dtype=torch.float64) - (torch.ones(D, dtype=torch.float64) @ unit) * unit
    directions = (parallel / parallel.norm()).expand(3, D)
    rows = regions.search_along(smooth, x, (margins > 0).long().tolist(), directions, [0.1] * 3, 0.4, 100, ALPHA,
                                100, [1, 2, 3], rounds=3)
    assert [r["status"] for r in rows] == ["none found"] * 3 and all(r["distance"] is None for r in rows)
    assert all(r["lower"] == 0.4 for r in rows), rows


def test_against_diagonal_counts_and_bounds():
    rows = [{"status": "confirmed", "distance": 1.0}, {"status": "confirmed", "distance": 0.5},
            {"status": "none found", "distance": None}, {"status": "not confirmed", "distance": 0.7},
            {"status": "confirmed", "distance": 2.0}]
    s = regions.against_diagonal([0.5, 0.6, 0.4, 0.3, 0.0], rows, 0.001, 0.001)
    assert (s["certified"], s["checked"], s["above"], s["none_found"], s["not_confirmed"]) == (4, 2, 1, 1, 1)
    assert s["median_ratio"] == pytest.approx((0.5 + 1.2) / 2)
    assert s["allowed"] == int(binom.isf(1e-6, 4, 0.002))  # over the certified inputs
    with pytest.raises(SdepureError, match="radii for"):
        regions.against_diagonal([0.5], rows, 0.001, 0.001)


@pytest.mark.parametrize("case", ["labels", "radius"])
def test_bad_search_input_is_one_clear_error(case):
    w, x, margins, smooth, logits = linear_case(2)
    with pytest.raises(SdepureError):
        if case == "labels":
            regions.nearest_change(smooth, logits, x, [0], [1, 2], 1.0, 10, ALPHA, 10)
        else:
            regions.search_along(smooth, x, [0, 1], x, [1, 1], 0.0, 10, ALPHA, 10, [1, 2])


def test_choose_images_by_rule():
    rows = [{"idx": 0, "label": 1, "predict": 1, "radius": 0.3, "correct": 1},
            {"idx": 1, "label": 2, "predict": ABSTAIN, "radius": 0.0, "correct": 0},
            {"idx": 2, "label": 3, "predict": 3, "radius": 0.9, "correct": 1},
            {"idx": 3, "label": 4, "predict": 7, "radius": 0.5, "correct": 0},
            {"idx": 4, "label": 5, "predict": 5, "radius": 0.1, "correct": 1}]
    picked = {k: r["idx"] for k, r in regions.choose_images(rows).items()}
    assert picked == {"large radius": 2, "small radius": 4, "misclassified": 3}
    assert {k: r["idx"] for k, r in regions.choose_images(rows[:3]).items()} == {
        "large radius": 2, "small radius": 0, "abstained": 1}
    with pytest.raises(SdepureError, match="nothing to slice"):
        regions.choose_images(rows[1:2])


def test_an_abstained_input_needs_a_target_and_then_any_class_is_a_change():
    w, x, margins, smooth, logits = linear_case(2, seed=3)
    with pytest.raises(SdepureError, match="give targets"):
        regions.nearest_change(smooth, logits, x, [ABSTAIN, 0], [1, 2], 3.0, 100, ALPHA, 100)
    other = (margins <= 0).long().tolist()
    _, rows = regions.nearest_change(smooth, logits, x, [ABSTAIN] * 2, [1, 2], 3.0, 100, ALPHA, 100, targets=other,
                                     steps=10, m=4, rounds=4)
    assert all((r["status"] == "confirmed") == (r["label"] != ABSTAIN) for r in rows), rows
    assert any(r["status"] == "confirmed" for r in rows), rows


def test_the_confirmation_draws_from_no_seed_of_the_search():
    """Every PREDICT seed of the searches and of the confirmations, recorded: the confirmations'
    seeds are their own (one per input) and none is a search's."""
    w, x, margins, smooth, logits = linear_case(6, seed=4)
    calls = []

    class Recording(Smooth):
        def predict_many(self, xs, n, alpha, batch, seeds, rows=None):
            calls.append((alpha, list(seeds)))
            return super().predict_many(xs, n, alpha, batch, seeds, rows)

    recording = Recording(smooth.base, 2, SIGMA)
    regions.nearest_change(recording, logits, x, (margins > 0).long().tolist(), [derive_seed(8, i) for i in range(6)],
                           3.0, 100, ALPHA, 100, steps=5, m=4, rounds=3)
    confirm = [s for a, seeds in calls if a == ALPHA for s in seeds]
    search = [s for a, seeds in calls if a != ALPHA for s in seeds]
    assert len(confirm) == len(set(confirm)) >= 1 and search and not set(confirm) & set(search)


def test_choose_images_with_one_correct_image_slices_it_once():
    rows = [{"idx": 0, "label": 1, "predict": 1, "radius": 0.3, "correct": 1}]
    assert list(regions.choose_images(rows)) == ["large radius"]
