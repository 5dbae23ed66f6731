"""The exact oracle: a Gaussian mixture data distribution with closed-form score and posterior.

p0(x0) = sum_k w_k N(mu_k, s_k^2 I). Diffused to time t (alpha_bar = a):
    p_t(x)      = sum_k w_k N(x; sqrt(a) mu_k, v_k I),   v_k = a s_k^2 + 1 - a
    score(x, t) = sum_k r_k(x) (sqrt(a) mu_k - x) / v_k, r_k the responsibilities under p_t
    p(x0 | x_t) = sum_k r_k(x_t) N(m_k, c_k I),
                  c_k = 1 / (1/s_k^2 + a/(1-a)),  m_k = c_k (mu_k / s_k^2 + sqrt(a) x_t / (1-a))
Inputs are flat vectors of shape (batch, d).
"""
from __future__ import annotations

import math

import torch

from ..errors import SdepureError
from ..schedules import VPSchedule
from .base import DiffusionModel


class GaussianMixture:
    def __init__(self, means, stds, weights=None, labels=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise SdepureError("means must have shape (components, dim)")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-9 or (self.stds <= 0).any():
            raise SdepureError("weights must be positive and sum to 1; stds must be positive")
        self.weights = w
        self.labels = torch.arange(k) if labels is None else torch.as_tensor(labels, dtype=torch.long)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * noise, comp

    def _log_resp(self, x, a):
        """log responsibilities of the components under p_t, x: (B, d), a: (B,)."""
        mu = self.means.to(x)
        v = a[:, None] * self.stds.to(x) ** 2 + (1 - a[:, None])                  # (B, K)
        sq = ((x[:, None, :] - a.sqrt()[:, None, None] * mu[None]) ** 2).sum(-1)  # (B, K)
        log_n = -0.5 * sq / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        return torch.log_softmax(torch.log(self.weights.to(x)) + log_n, dim=1), v

    def score(self, x, a):
        log_r, v = self._log_resp(x, a)
        mu = self.means.to(x)
        diff = a.sqrt()[:, None, None] * mu[None] - x[:, None, :]               # (B, K, d)
        return (log_r.exp()[..., None] * diff / v[..., None]).sum(1)

    def posterior(self, x, a):
        """(weights (B, K), means (B, K, d), variances (B, K)) of p(x0 | x_t = x)."""
        log_r, _ = self._log_resp(x, a)
        s2 = self.stds.to(x) ** 2
        c = 1.0 / (1.0 / s2[None] + (a / (1 - a))[:, None])                      # (B, K)
        m = c[..., None] * (self.means.to(x)[None] / s2[None, :, None]
                            + (a.sqrt() / (1 - a))[:, None, None] * x[:, None, :])
        return log_r.exp(), m, c


class GaussianMixtureModel(DiffusionModel):
    """A DiffusionModel whose score is the exact score of a diffused Gaussian mixture."""

    def __init__(self, mixture: GaussianMixture, schedule: VPSchedule):
        super().__init__(schedule)
        self.mixture = mixture

    def _a(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.schedule.alpha_bar(t).to(x.dtype)

    def score(self, x, t):
        return self.mixture.score(x, self._a(t, x))

    def eps(self, x, t):
        return -(1 - self._a(t, x)).sqrt()[:, None] * self.score(x, t)

    def posterior(self, x, t):
        return self.mixture.posterior(x, self._a(t, x))
