"""Purifiers and the purified base classifier: DensePure, DiffPure, Carlini et al., none.

A purifier maps images in [0, 1] that already carry Gaussian noise of level sigma (the
smoothing noise) to purified images in [0, 1]. Noise sigma on [0, 1] is 2 sigma on the model's
[-1, 1] scale, so x_t* = sqrt(alpha_bar(t*)) (2 x_noisy - 1) is exactly a forward-diffused sample
at t* when alpha_bar(t*) = 1 / (1 + 4 sigma^2).

| method    | purifier                                   | votes |
| none      | identity                                   | 1     |
| carlini   | one-shot x0 prediction at t*               | 1     |
| diffpure  | one reverse-process solve from t*          | 1     |
| densepure | K reverse solves with different noise      | K     |

Vote tie rule: the most frequent label wins; among tied labels, the lowest class index.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import SdepureError
from .models.base import DiffusionModel
from .schedules import DiscreteVP
from .settings import Purifier
from .solvers import solve

DEFAULT_T_RULE = {"carlini": "first", "diffpure": "nearest", "densepure": "nearest"}


class Identity(nn.Module):
    def forward(self, x, seed: int):
        return x


class OneShot(nn.Module):
    """Carlini et al.: the model's x0 prediction at t*, clipped to the image range."""

    def __init__(self, model: DiffusionModel, t_star: float):
        super().__init__()
        self.model, self.t_star = model, float(t_star)

    def forward(self, x, seed: int):
        ab = float(self.model.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)))
        xt = ab ** 0.5 * (2 * x - 1)
        t = torch.full((x.shape[0],), self.t_star, dtype=x.dtype, device=x.device)
        return (self.model.x0(xt, t).clamp(-1, 1) + 1) / 2


class ReverseProcess(nn.Module):
    """DiffPure's purifier: scale to x_t*, solve the reverse process to t = 0.
    `grad` and `adjoint_method` choose how gradients flow through the solver (see solvers.solve)."""

    def __init__(self, model: DiffusionModel, t_star: float, steps: int, solver: str = "euler",
                 grad: str | None = None, adjoint_method: str | None = None):
        super().__init__()
        self.model, self.t_star, self.steps, self.solver = model, float(t_star), int(steps), solver
        self.grad, self.adjoint_method = grad, adjoint_method

    def forward(self, x, seed: int):
        ab = float(self.model.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)))
        xt = ab ** 0.5 * (2 * x - 1)
        x0 = solve(self.model, xt, self.t_star, self.steps, seed, self.solver, grad=self.grad,
                   adjoint_method=self.adjoint_method)
        return (x0.clamp(-1, 1) + 1) / 2


def majority_vote(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (B, K) -> (B,): most frequent, ties to the lowest class index."""
    counts = nn.functional.one_hot(labels, num_classes).sum(1)
    return counts.argmax(1)  # argmax returns the first maximal index


class PurifiedClassifier(nn.Module):
    """Base classifier for smoothing: purify each input `votes` times, classify, vote."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module, num_classes: int, votes: int = 1):
        super().__init__()
        if votes < 1:
            raise SdepureError(f"votes must be >= 1, got {votes}")
        self.purifier, self.classifier = purifier, classifier
        self.num_classes, self.votes = num_classes, int(votes)

    def vote_logits(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """(B, K, classes) logits of the K purified copies of each input; row b*K + k is copy k of b."""
        xr = x.repeat_interleave(self.votes, dim=0)
        logits = self.classifier(self.purifier(xr, seed))
        return logits.reshape(x.shape[0], self.votes, -1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return majority_vote(self.vote_logits(x, seed).argmax(-1), self.num_classes)


def t_star_for(schedule, sigma: float, method: str, rule: str | None = None) -> float:
    if isinstance(schedule, DiscreteVP):
        return schedule.t_star(sigma, rule or DEFAULT_T_RULE.get(method, "nearest"))
    return schedule.t_star(sigma)


def resolve_t_star(settings: Purifier, schedule) -> float:
    """t* given directly, or the time whose noise level matches sigma on this schedule."""
    if settings.t_star is not None:
        return settings.t_star
    return t_star_for(schedule, settings.sigma, settings.method, settings.t_rule)


def build_purifier(settings: Purifier, model: DiffusionModel | None, grad: str | None = None) -> nn.Module:
    """The purifier module for `settings` (identity for method none)."""
    if settings.method == "none":
        return Identity()
    if model is None:
        raise SdepureError(f"method {settings.method} needs a diffusion model")
    t_star = resolve_t_star(settings, model.schedule)
    if settings.method == "carlini":
        return OneShot(model, t_star)
    return ReverseProcess(model, t_star, settings.steps, settings.solver, grad, settings.adjoint_method)


def build(settings: Purifier, model: DiffusionModel | None, classifier: nn.Module,
          num_classes: int) -> PurifiedClassifier:
    """The purified base classifier for certification (no gradients)."""
    return PurifiedClassifier(build_purifier(settings, model), classifier, num_classes, settings.votes)
