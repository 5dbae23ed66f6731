"""Soundness of Cohen's CERTIFY and PREDICT as sdepure implements them, against a base classifier
whose smoothed version is known exactly.

Base classifier f(x) = 1[w.x > b] on R^d. Under x + delta, delta ~ N(0, sigma^2 I), w.delta is
N(0, sigma^2 |w|^2), so P(f(x + delta) = 1) = Phi(m / sigma) with m = (w.x - b) / |w| the signed
distance to the hyperplane. The smoothed classifier g predicts 1 iff m > 0, its decision boundary
is the same hyperplane, and its true L2 robust radius at x is |m|. A certificate (c, r) with
c != ABSTAIN over-claims when c != g(x) or r > |m|. Cohen et al. (Theorem 1 and Proposition 2)
bound the probability of an over-claim by alpha for each input; PREDICT returns a class other
than g(x) with probability at most alpha.

2,000 seeded inputs; the count of failures must stay below the upper 1e-6 quantile of
Binomial(2000, alpha) (the test fails by chance with probability < 1e-6 if sdepure is sound).
The same inputs with the Clopper-Pearson bound replaced by the point estimate n_A / n (an
unsound certifier), and PREDICT without its binomial test, must exceed that quantile: the test
can tell sound from unsound.
"""
import numpy as np
import pytest
import torch
from scipy.stats import binom

from sdepure import smoothing
from sdepure.rng import derive_seed, generator
from sdepure.smoothing import ABSTAIN, Smooth

D, SIGMA, ALPHA, N0, N, BATCH = 4, 0.5, 0.05, 64, 400, 400
INPUTS = 2000
LIMIT = int(binom.ppf(1 - 1e-6, INPUTS, ALPHA))  # 149 of 2000 (7.45%) at alpha = 0.05


def linear_problem(count: int, spread: float, seed: int = 0):
    """w, b and inputs whose margins m are uniform on [-spread sigma, spread sigma]. CERTIFY is
    audited at spread 3 (p_A from 0.5 to 0.9987, where radii are informative and a loose or
    unsound bound shows), PREDICT at spread 0.2 (p_A within 0.08 of 1/2, where it must abstain
    rather than guess)."""
    g = generator(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    b = 0.3
    unit = w / w.norm()
    margins = (torch.rand(count, generator=g, dtype=torch.float64) * 2 - 1) * spread * SIGMA
    along = torch.randn(count, D, generator=g, dtype=torch.float64)
    along -= (along @ unit)[:, None] * unit  # a random offset parallel to the hyperplane
    x = along + (b / w.norm() + margins)[:, None] * unit
    return w, b, x, margins


def base_classifier(w, b):
    def f(batch, seed):  # deterministic; the noise comes from Smooth, seeded per (input, phase, batch)
        return (batch.reshape(batch.shape[0], -1) @ w > b).long()
    return f


def audit_certify(smooth: Smooth, x, margins):
    """Over-claimed certificates and abstentions."""
    over = abstain = 0
    for i in range(len(x)):
        pred, radius, _ = smooth.certify(x[i], N0, N, ALPHA, BATCH, seed=derive_seed(11, i))
        if pred == ABSTAIN:
            abstain += 1
        elif pred != int(margins[i] > 0) or radius > abs(float(margins[i])):
            over += 1
    return {"over_claims": over, "abstain": abstain}


def audit_predict(smooth: Smooth, x, margins):
    """PREDICTs of a class other than g(x), and abstentions."""
    wrong = abstain = 0
    for i in range(len(x)):
        p = smooth.predict(x[i], N, ALPHA, BATCH, seed=derive_seed(12, i))
        abstain += p == ABSTAIN
        wrong += p not in (ABSTAIN, int(margins[i] > 0))
    return {"wrong": wrong, "abstain": abstain}


def test_margins_are_the_true_distances():
    w, b, x, margins = linear_problem(50, 3.0)
    assert torch.allclose((x @ w - b) / w.norm(), margins, atol=1e-12)
    assert float(margins.abs().max()) <= 3.0 * SIGMA


def test_certify_is_sound_on_a_linear_classifier(monkeypatch):
    w, b, x, margins = linear_problem(INPUTS, 3.0)
    smooth = Smooth(base_classifier(w, b), num_classes=2, sigma=SIGMA)
    counts = audit_certify(smooth, x, margins)
    print(f"\nCERTIFY, linear classifier, d={D}, sigma={SIGMA}, alpha={ALPHA}, n0={N0}, n={N}, "
          f"{INPUTS} inputs: {counts}; limit {LIMIT} (upper 1e-6 quantile of Binomial({INPUTS}, {ALPHA}))")
    assert counts["over_claims"] <= LIMIT, counts
    assert counts["abstain"] < INPUTS / 4, counts  # informative: sound by certifying, not by abstaining
    # the point estimate n_A / n in place of the Clopper-Pearson bound must fail the same limit
    monkeypatch.setattr(smoothing, "lower_confidence_bound", lambda n_a, n, alpha: min(n_a / n, 1 - 1e-9))
    unsound = audit_certify(smooth, x, margins)
    assert unsound["over_claims"] > LIMIT, unsound


def test_predict_is_sound_on_a_linear_classifier(monkeypatch):
    w, b, x, margins = linear_problem(INPUTS, 0.2, seed=1)
    smooth = Smooth(base_classifier(w, b), num_classes=2, sigma=SIGMA)
    counts = audit_predict(smooth, x, margins)
    print(f"\nPREDICT, same classifier, margins within 0.2 sigma, n={N}: {counts}; limit {LIMIT}")
    assert counts["wrong"] <= LIMIT, counts
    # PREDICT without its binomial test (always the top count) must fail the same limit
    monkeypatch.setattr(smoothing, "binomtest", lambda k, n, p: type("Test", (), {"pvalue": 0.0})())
    unsound = audit_predict(smooth, x, margins)
    assert unsound["wrong"] > LIMIT, unsound


@pytest.mark.parametrize("n_a, n", [(400, 400), (300, 400), (201, 400)])
def test_radius_is_sigma_times_quantile_of_the_lower_bound(n_a, n):
    """The claimed radius is sigma * Phi^-1(pA_lower) with pA_lower the Beta(alpha; n_a, n-n_a+1)
    quantile: checked by bisection on the binomial tail, P(Bin(n, p) >= n_a) = alpha."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom.sf(n_a - 1, n, mid) < ALPHA else (lo, mid)
    assert smoothing.lower_confidence_bound(n_a, n, ALPHA) == pytest.approx(lo, abs=1e-9)
    assert np.isfinite(lo)


# -- adaptive sampling: ISS and sequential --------------------------------------------------------

def audit(smooth: Smooth, x, margins, n, batch, seed, **sampling):
    """Over-claims (a wrong class, or a radius above the true one) and draws per input."""
    over = abstain = draws = 0
    for i in range(len(x)):
        pred, radius, info = smooth.certify(x[i], N0, n, ALPHA, batch, seed=derive_seed(seed, i), **sampling)
        draws += info["draws"]
        if pred == ABSTAIN:
            abstain += 1
        elif pred != int(margins[i] > 0) or radius > abs(float(margins[i])):
            over += 1
    return {"over_claims": over, "abstain": abstain, "mean_draws": draws / len(x)}


def test_iss_is_sound_on_a_linear_classifier():
    """ISS with the cap N: over-claims within the same binomial limit, and fewer draws than N."""
    w, b, x, margins = linear_problem(INPUTS, 3.0, seed=2)
    smooth = Smooth(base_classifier(w, b), num_classes=2, sigma=SIGMA)
    counts = audit(smooth, x, margins, N, BATCH, 13, sampling="iss", radius_tol=0.05)
    print(f"\nISS (radius-tol 0.05, cap {N}), {INPUTS} inputs: {counts}; limit {LIMIT}")
    assert counts["over_claims"] <= LIMIT, counts
    assert counts["abstain"] < INPUTS / 4 and counts["mean_draws"] < N0 + N, counts


def test_iss_final_count_never_reuses_a_pilot_draw():
    """The pilot (the n0 selection draws) decides how many estimation draws to take; the bound
    counts only fresh ones: no seed of the final count is a seed of the pilot."""
    from sdepure.rng import Draws

    class Recording(Draws):
        def __init__(self):
            super().__init__("cpu")
            self.seeds = []

        def randn(self, shape, seed, *args, **kwargs):
            self.seeds.append((seed, shape[0]))
            return super().randn(shape, seed, *args, **kwargs)

    w, b, x, margins = linear_problem(40, 3.0, seed=3)
    for i in range(len(x)):
        draws = Recording()
        smooth = Smooth(base_classifier(w, b), num_classes=2, sigma=SIGMA, rng=draws)
        _, _, info = smooth.certify(x[i], N0, 2000, ALPHA, 50, seed=derive_seed(14, i), sampling="iss",
                                    radius_tol=0.05)
        pilot_batches = -(-N0 // 50)
        pilot, final = draws.seeds[:pilot_batches], draws.seeds[pilot_batches:]
        assert sum(m for _, m in pilot) == N0 and sum(m for _, m in final) == info["draws"] - N0
        assert not {s for s, _ in pilot} & {s for s, _ in final}


SEQ_BATCH, SEQ_CAP, SEQ_RADII = 50, 6400, (0.25, 0.5)  # checkpoints 50, 100, ..., 3200, 6400: eight


def test_sequential_is_sound_at_the_thresholds_and_needs_the_split(monkeypatch):
    """Inputs exactly at each target radius's threshold (p_A = Phi(r / sigma), true radius r): a
    certificate of r there is an over-claim. With alpha split over the eight checkpoints the
    over-claims stay within the binomial limit; looking at every checkpoint with the whole alpha
    (an unsplit bound) over-claims several times as often and must exceed it."""
    w, b, x, _ = linear_problem(INPUTS, 1.0, seed=4)
    unit = w / w.norm()
    margins = torch.tensor([SEQ_RADII[i % len(SEQ_RADII)] for i in range(INPUTS)], dtype=torch.float64)
    x = x + (margins - (x @ w - b) / w.norm())[:, None] * unit  # moved onto the threshold margins
    smooth = Smooth(base_classifier(w, b), num_classes=2, sigma=SIGMA)
    assert len(smoothing.checkpoints(SEQ_CAP, SEQ_BATCH)) == 8
    counts = audit(smooth, x, margins, SEQ_CAP, SEQ_BATCH, 15, sampling="sequential", radii=SEQ_RADII)
    print(f"\nsequential (radii {SEQ_RADII}, cap {SEQ_CAP}, 8 checkpoints), inputs at the thresholds: {counts}; "
          f"limit {LIMIT}")
    assert counts["over_claims"] <= LIMIT, counts
    monkeypatch.setattr(smoothing, "checkpoint_alpha", lambda alpha, count: alpha)
    unsplit = audit(smooth, x, margins, SEQ_CAP, SEQ_BATCH, 15, sampling="sequential", radii=SEQ_RADII)
    print(f"unsplit alpha: {unsplit}")
    assert unsplit["over_claims"] > LIMIT, unsplit


def test_sequential_is_sound_across_margins_and_stops_early():
    """Margins spread as for CERTIFY: sound, and most inputs decide before the cap."""
    w, b, x, margins = linear_problem(INPUTS, 3.0, seed=5)
    smooth = Smooth(base_classifier(w, b), num_classes=2, sigma=SIGMA)
    counts = audit(smooth, x, margins, SEQ_CAP, SEQ_BATCH, 16, sampling="sequential", radii=SEQ_RADII)
    print(f"\nsequential, margins within 3 sigma: {counts}; limit {LIMIT}")
    assert counts["over_claims"] <= LIMIT, counts
    assert counts["mean_draws"] < (N0 + SEQ_CAP) / 4, counts
