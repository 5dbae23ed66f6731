"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): CERTIFY and PREDICT.

The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), is
certified at x with L2 radius sigma * Phi^-1(pA_lower), where pA_lower is a one-sided
(1 - alpha) Clopper-Pearson lower bound on P(f(x + delta) = cA).
Randomness (the address tree in rng.py): batch b of phase p (rng.Smoothing) draws its noise and
the base classifier's seed from derive_seed(phase, b, rng.Batch.NOISE / BASE), so a result
depends on (seed, n0, n, batch), nothing else.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

from .errors import SdepureError
from .rng import Batch, Draws, Smoothing, derive_seed

ABSTAIN = -1
BaseClassifier = Callable[[torch.Tensor, int], torch.Tensor]  # (noisy batch, seed) -> labels


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    return 0.0 if n_a == 0 else float(beta_dist.ppf(alpha, n_a, n - n_a + 1))


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
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Label counts of the base classifier on `num` noisy copies of one input x."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for b, start in enumerate(range(0, num, batch)):
            m = min(batch, num - start)
            noise = self.draws.randn((m, *x.shape), derive_seed(seed, b, Batch.NOISE), x.device, x.dtype)
            labels = self.base(x.unsqueeze(0) + self.sigma * noise, derive_seed(seed, b, Batch.BASE))
            counts += np.bincount(labels.cpu().numpy(), minlength=self.num_classes)
            if progress:
                progress(m)
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch: int, seed: int,
                progress: Callable[[int], None] | None = None) -> tuple[int, float, dict]:
        """(prediction or ABSTAIN, certified L2 radius, details)."""
        check_params(self.sigma, alpha, n0, n, batch)
        counts0 = self.sample_counts(x, n0, batch, derive_seed(seed, Smoothing.SELECT), progress)
        c_a = int(counts0.argmax())
        counts = self.sample_counts(x, n, batch, derive_seed(seed, Smoothing.ESTIMATE), progress)
        n_a = int(counts[c_a])
        p_lower = lower_confidence_bound(n_a, n, alpha)
        info = {"n_a": n_a, "p_a_lower": p_lower, "guess": c_a}
        if p_lower < 0.5:
            return ABSTAIN, 0.0, info
        return c_a, self.sigma * float(norm.ppf(p_lower)), info

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch: int, seed: int) -> int:
        """Cohen's PREDICT: abstain unless the top label beats the runner-up at level alpha."""
        check_params(self.sigma, alpha, 1, n, batch)
        counts = self.sample_counts(x, n, batch, derive_seed(seed, Smoothing.PREDICT))
        top2 = counts.argsort()[::-1][:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])


def format_row(row: dict) -> str:
    """One line of certify.tsv (Cohen's columns idx label predict radius correct time)."""
    return (f"{row['idx']}\t{row['label']}\t{row['predict']}\t{row['radius']:.4f}\t"
            f"{row['correct']}\t{row['time']:.3f}\n")


def certify_images(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, indices, n0: int, n: int,
                   alpha: float, batch: int, seed: int, tsv=None,
                   progress: Callable[[int], None] | None = None, device=None,
                   on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """CERTIFY each image x[i], i in indices, with a seed addressed by (seed, i), so a row does
    not depend on which other images ran, in which shard or order. `x` only needs x[i] (images
    may be read lazily); each goes to `device`. Each row goes to the open text file `tsv`
    (Cohen's format) in one write, flushed, as soon as it is known, then to `on_row`."""
    import time

    rows = []
    for i in indices:
        start = time.time()
        xi = x[i] if device is None else x[i].to(device)
        pred, radius, _ = smooth.certify(xi, n0, n, alpha, batch, derive_seed(seed, i), progress)
        row = {"idx": int(i), "label": int(y[i]), "predict": int(pred), "radius": float(radius),
               "correct": int(pred == int(y[i])), "time": time.time() - start}
        rows.append(row)
        if tsv is not None:
            tsv.write(format_row(row))
            tsv.flush()
        if on_row is not None:
            on_row(row)
    return rows
