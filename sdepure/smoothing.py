"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): CERTIFY and PREDICT.

The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), is
certified at x with L2 radius sigma * Phi^-1(pA_lower), where pA_lower is a one-sided
(1 - alpha) Clopper-Pearson lower bound on P(f(x + delta) = cA).

How many draws the bound takes (`sampling`); n0 selection draws pick cA in every mode:
- fixed: Cohen's CERTIFY, n estimation draws.
- iss: input-specific sampling (Chen et al., AAAI 2022). The n0 selection draws are the pilot:
  with p_hat their share of cA, the estimation takes the fewest draws (at most n) whose radius at
  p_hat is within radius_tol of the radius at n, and abstains at once when even n would. The
  bound uses those fresh draws only: the pilot decides how many, never what they count.
- sequential: anytime-valid at target radii. Clopper-Pearson at checkpoints batch, 2 batch, 4 batch,
  ..., n, each at alpha / (number of checkpoints), so all bounds hold at once with probability
  1 - alpha; the draws stop at the first checkpoint where every target radius r is decided:
  certified (lower bound >= Phi(r / sigma)), or out of reach: with 1 - FUTILITY confidence p_A is
  below what the cap n itself would need to certify r. Giving up costs power, never soundness.
  The radius is the bound at that checkpoint's split alpha, never at the whole alpha.
Randomness (the address tree in rng.py): batch b of phase p (rng.Smoothing) draws its noise and
the base classifier's seed from derive_seed(phase, b, rng.Batch.NOISE / BASE), so a result
depends on (seed, n0, n, batch, sampling), nothing else; the sequential draws up to a checkpoint
are those of fixed sampling.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

from .brownian import Streams
from .errors import SdepureError
from .rng import Batch, Draws, Smoothing, derive_seed

ABSTAIN = -1
SAMPLINGS = ("fixed", "iss", "sequential")
FUTILITY = 0.05  # sequential: the confidence with which a target radius is given up (power only)
BaseClassifier = Callable[[torch.Tensor, int], torch.Tensor]  # (noisy batch, seed) -> labels


def lower_confidence_bound(n_a: float, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (n_a may be
    fractional: ISS evaluates it at n p_hat)."""
    return 0.0 if n_a <= 0 else float(beta_dist.ppf(alpha, n_a, n - n_a + 1))


def upper_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound."""
    return 1.0 if n_a >= n else float(beta_dist.ppf(1 - alpha, n_a + 1, n - n_a))


def radius_of(p_lower: float, sigma: float) -> float | None:
    """The certified radius of a lower bound; None: abstain (Cohen: below 1/2)."""
    return None if p_lower < 0.5 else sigma * float(norm.ppf(p_lower))


def iss_sample_size(p_hat: float, cap: int, alpha: float, sigma: float, tol: float) -> int:
    """ISS: the fewest draws n <= cap whose radius at p_hat is within tol of the radius at cap
    (and certifies where cap does); 0 where p_hat abstains even at cap. The radius grows with n
    at fixed p_hat, so a bisection finds it."""
    def radius(n):
        return radius_of(lower_confidence_bound(p_hat * n, n, alpha), sigma)
    full = radius(cap)
    if full is None:
        return 0
    lo, hi = 1, cap  # radius(hi) qualifies
    while lo < hi:
        mid = (lo + hi) // 2
        r = radius(mid)
        lo, hi = (lo, mid) if r is not None and full - r <= tol else (mid + 1, hi)
    return hi


def checkpoint_alpha(alpha: float, count: int) -> float:
    """Each of `count` checkpoints' share of alpha: the union of their failures stays <= alpha."""
    return alpha / count


def checkpoints(cap: int, batch: int) -> list[int]:
    """Sequential sampling's checkpoints: batch, 2 batch, 4 batch, ... below cap, then cap."""
    if cap < batch:
        raise SdepureError(f"sequential sampling looks at its bound every batch, then every 2, 4, ... batches: "
                           f"the cap n = {cap} is below its first checkpoint, one batch of {batch} draws; raise "
                           f"--n or lower --batch")
    marks, m = [], batch
    while m < cap:
        marks.append(m)
        m *= 2
    return marks + [cap]


def check_params(sigma: float, alpha: float, n0: int, n: int, batch: int) -> None:
    if not sigma > 0:
        raise SdepureError(f"sigma must be > 0, got {sigma}")
    if not 0 < alpha < 1:
        raise SdepureError(f"alpha must be in (0, 1), got {alpha}")
    if n0 < 1 or n < 1:
        raise SdepureError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if batch < 1:
        raise SdepureError(f"batch must be >= 1, got {batch}")


class Smooth:
    """rng: "cpu" draws the smoothing noise from the device-independent CPU stream, "device" on
    the input's device from the same addresses (see rng.py); or the rng.Draws object to use
    (the defense's own)."""

    def __init__(self, base: BaseClassifier, num_classes: int, sigma: float, rng: str | Draws = "cpu"):
        if not sigma > 0:
            raise SdepureError(f"sigma must be > 0, got {sigma}")
        self.draws = rng if isinstance(rng, Draws) else Draws(rng)
        self.base, self.num_classes, self.sigma = base, num_classes, float(sigma)

    def sample_counts(self, x: torch.Tensor, num: int, batch: int, seed: int,
                      progress: Callable[[int], None] | None = None, first: int = 0) -> np.ndarray:
        """Label counts of the base classifier on noisy copies first..num-1 of one input x (first:
        a multiple of batch; copy j is row j % batch of batch j // batch)."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(first, num, batch):
            b, m = start // batch, min(batch, num - start)
            noise = self.draws.randn((m, *x.shape), derive_seed(seed, b, Batch.NOISE), x.device, x.dtype)
            labels = self.base(x.unsqueeze(0) + self.sigma * noise, derive_seed(seed, b, Batch.BASE))
            counts += np.bincount(labels.cpu().numpy(), minlength=self.num_classes)
            if progress:
                progress(m)
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch: int, seed: int,
                progress: Callable[[int], None] | None = None, sampling: str = "fixed",
                radius_tol: float | None = None, radii=()) -> tuple[int, float, dict]:
        """(prediction or ABSTAIN, certified L2 radius, details); details["draws"] counts the
        draws taken, n0 included. sampling: see the module docstring (n is the cap for iss and
        sequential; radius_tol is iss's tolerance, radii sequential's target radii)."""
        check_params(self.sigma, alpha, n0, n, batch)
        counts0 = self.sample_counts(x, n0, batch, derive_seed(seed, Smoothing.SELECT), progress)
        c_a = int(counts0.argmax())
        seed_est = derive_seed(seed, Smoothing.ESTIMATE)
        if sampling == "fixed":
            used = n
        elif sampling == "iss":
            used = iss_sample_size(counts0[c_a] / n0, n, alpha, self.sigma, radius_tol)
        elif sampling == "sequential":
            used, n_a, p_lower = self._sequential(x, c_a, n, alpha, batch, seed_est, radii, progress)
        else:
            raise SdepureError(f"unknown sampling {sampling!r}; choose from {', '.join(SAMPLINGS)}")
        if sampling != "sequential":
            n_a = int(self.sample_counts(x, used, batch, seed_est, progress)[c_a]) if used else 0
            p_lower = lower_confidence_bound(n_a, used, alpha) if used else 0.0
        info = {"n_a": n_a, "p_a_lower": p_lower, "guess": c_a, "draws": n0 + used}
        radius = radius_of(p_lower, self.sigma)
        return (ABSTAIN, 0.0, info) if radius is None else (c_a, radius, info)

    def _sequential(self, x, c_a: int, cap: int, alpha: float, batch: int, seed: int, radii, progress):
        """(draws, count of c_a, lower bound) at the first checkpoint where every target radius
        is decided, or at the cap; every lower bound at alpha split over the checkpoints."""
        marks = checkpoints(cap, batch)
        alpha_k = checkpoint_alpha(alpha, len(marks))
        z = float(norm.isf(alpha_k))
        thresholds = [float(norm.cdf(r / self.sigma)) for r in radii]
        # what the share of c_a must be for the cap's bound to reach each threshold (normal approximation)
        reach = [t + z * (t * (1 - t) / cap) ** 0.5 for t in thresholds]
        n_a, done = 0, 0
        for mark in marks:
            n_a += int(self.sample_counts(x, mark, batch, seed, progress, first=done)[c_a])
            done = mark
            lower = lower_confidence_bound(n_a, mark, alpha_k)
            upper = upper_confidence_bound(n_a, mark, FUTILITY)
            if all(lower >= t or upper < q for t, q in zip(thresholds, reach)):
                break
        return done, n_a, lower

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch: int, seed: int) -> int:
        """Cohen's PREDICT: abstain unless the top label beats the runner-up at level alpha."""
        check_params(self.sigma, alpha, 1, n, batch)
        return _decide(self.sample_counts(x, n, batch, derive_seed(seed, Smoothing.PREDICT)), alpha)

    def predict_many(self, xs: torch.Tensor, n: int, alpha: float, batch: int, seeds, rows: int | None = None) -> list[int]:
        """PREDICT of each input xs[p] under seeds[p]: the labels predict(xs[p], n, alpha, batch,
        seeds[p]) gives, from the same draws (counts_many), many inputs per call of the base."""
        check_params(self.sigma, alpha, 1, n, batch)
        return [_decide(c, alpha) for c in self.counts_many(xs, n, batch, [derive_seed(int(s), Smoothing.PREDICT)
                                                                          for s in seeds], rows)]

    def noisy_copies(self, xs: torch.Tensor, m: int, seed_of: Callable[[int, Batch], int]):
        """(noisy (len(xs) m, ...), address): m noisy copies of each input, input-major, and the
        base classifier's rows: input k's noise is drawn under seed_of(k, NOISE) and its copy j is
        row j of seed_of(k, BASE). Differentiable in xs (the soft smoothed classifier's attack)."""
        noise = torch.stack([self.draws.randn((m, *xs.shape[1:]), seed_of(k, Batch.NOISE), xs.device, xs.dtype)
                             for k in range(len(xs))])
        address = Streams(tuple(seed_of(k, Batch.BASE) for k in range(len(xs)) for _ in range(m)),
                          tuple(range(m)) * len(xs), m)
        return (xs.unsqueeze(1) + self.sigma * noise).reshape(-1, *xs.shape[1:]), address

    def counts_many(self, xs: torch.Tensor, num: int, batch: int, seeds, rows: int | None = None) -> np.ndarray:
        """(inputs, classes): sample_counts(xs[p], num, batch, seeds[p]) for every p, with the noisy
        copies of many inputs in one call of the base classifier (at most `rows` rows, default
        batch; at least one input's block). The base classifier must take a brownian.Streams
        address (Defense.predict does): row j of input p's block b draws from
        (derive_seed(seeds[p], b, BASE), row j), as in sample_counts."""
        if xs.dim() < 2 or len(seeds) != xs.shape[0]:
            raise SdepureError(f"batched PREDICT takes a batch of inputs and one seed each; got {tuple(xs.shape)} "
                               f"inputs and {len(seeds)} seeds")
        counts = np.zeros((xs.shape[0], self.num_classes), dtype=np.int64)
        for start in range(0, num, batch):
            b, m = start // batch, min(batch, num - start)
            group = max(1, (rows or batch) // m)
            for p0 in range(0, xs.shape[0], group):
                ps = range(p0, min(p0 + group, xs.shape[0]))
                noisy, address = self.noisy_copies(xs[p0:p0 + len(ps)], m,
                                                   lambda k, tag: derive_seed(seeds[p0 + k], b, tag))
                labels = self.base(noisy, address).cpu().numpy().reshape(len(ps), m)
                for k, p in enumerate(ps):
                    counts[p] += np.bincount(labels[k], minlength=self.num_classes)
        return counts


def _decide(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision from the label counts: the top label if it beats the runner-up in a
    two-sided binomial test at level alpha, else ABSTAIN."""
    top2 = counts.argsort()[::-1][:2]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2[0])


def format_row(row: dict, cost: bool = True) -> str:
    """One line of certify.tsv: Cohen's columns idx label predict radius correct time, then (cost)
    the image's draws and network calls (report.COST_COLUMNS)."""
    line = (f"{row['idx']}\t{row['label']}\t{row['predict']}\t{row['radius']:.4f}\t"
            f"{row['correct']}\t{row['time']:.3f}")
    return line + (f"\t{row['draws']}\t{row['calls']}\n" if cost else "\n")


def certify_images(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, indices, n0: int, n: int,
                   alpha: float, batch: int, seed: int, tsv=None,
                   progress: Callable[[int], None] | None = None, device=None,
                   on_row: Callable[[dict], None] | None = None, calls: Callable[[], int] | None = None,
                   cost: bool = True, **sampling) -> list[dict]:
    """CERTIFY each image x[i], i in indices, with a seed addressed by (seed, i), so a row does
    not depend on which other images ran, in which shard or order. `x` only needs x[i] (images
    may be read lazily); each goes to `device`. Each row goes to the open text file `tsv`
    (format_row; `cost`: with the cost columns) in one write, flushed, as soon as it is known,
    then to `on_row`. `calls()` reads a running count of network calls (the row gets its
    increase); `sampling`: Smooth.certify's sampling, radius_tol, radii."""
    import time

    rows = []
    for i in indices:
        start, before = time.time(), calls() if calls else 0
        xi = x[i] if device is None else x[i].to(device)
        pred, radius, info = smooth.certify(xi, n0, n, alpha, batch, derive_seed(seed, i), progress, **sampling)
        row = {"idx": int(i), "label": int(y[i]), "predict": int(pred), "radius": float(radius),
               "correct": int(pred == int(y[i])), "time": time.time() - start, "draws": int(info["draws"]),
               "calls": (calls() - before) if calls else 0}
        rows.append(row)
        if tsv is not None:
            tsv.write(format_row(row, cost))
            tsv.flush()
        if on_row is not None:
            on_row(row)
    return rows
