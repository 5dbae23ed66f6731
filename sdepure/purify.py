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

from .brownian import Streams
from .errors import SdepureError
from .models.base import DiffusionModel
from .precision import check_precision, prepare
from .precision import run as _run_net
from .rng import check_rng, to_device
from .schedules import DiscreteVP
from .sde import network_call
from .settings import Purifier
from .solvers import EXACT_GRAPH_BUDGET, ODE_METHODS, check_eta, graph_bytes, plain_graph_fits, solve

DETERMINISTIC = (*ODE_METHODS, "dpm-solver-2m")  # and ddim at eta = 0
DEFAULT_T_RULE = {"carlini": "first", "diffpure": "nearest", "densepure": "nearest"}


class Identity(nn.Module):
    deterministic = True

    def forward(self, x, seed: int, streams: Streams | None = None):
        return x


class OneShot(nn.Module):
    """Carlini et al.: the model's x0 prediction at t*, clipped to the image range."""
    deterministic = True

    def __init__(self, model: DiffusionModel, t_star: float, precision: str = "fp32"):
        super().__init__()
        check_precision(precision)
        self.model, self.t_star, self.precision = model, float(t_star), precision
        self.ab = float(model.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)))
        prepare(model)

    def forward(self, x, seed: int, streams: Streams | None = None):
        xt = self.ab ** 0.5 * (2 * x - 1)
        return (network_call(self.model.x0, xt, self.t_star, precision=self.precision).clamp(-1, 1) + 1) / 2


class ReverseProcess(nn.Module):
    """DiffPure's purifier: scale to x_t*, solve the reverse process to t = 0.
    `grad` and `adjoint_method` choose how gradients flow through the solver, `eta` is ddim's
    noise level, `rng` and `precision` how draws and network calls are made (see solvers.solve)."""

    def __init__(self, model: DiffusionModel, t_star: float, steps: int, solver: str = "euler",
                 grad: str | None = None, adjoint_method: str | None = None, *, eta: float = 0.0,
                 rng: str = "cpu", precision: str = "fp32"):
        super().__init__()
        # solver, steps and gradient mode are validated by settings.Purifier; the options below
        # are not part of it yet
        check_rng(rng)
        check_precision(precision)
        if eta != 0.0:
            if solver != "ddim":
                raise SdepureError(f"eta applies to the ddim solver only (solver is {solver})")
            check_eta(eta)
        self.model, self.t_star, self.steps, self.solver = model, float(t_star), int(steps), solver
        self.grad, self.adjoint_method = grad, adjoint_method
        self.eta, self.rng, self.precision = float(eta), rng, precision
        self.ab = float(model.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)))
        self.graph_budget = EXACT_GRAPH_BUDGET
        self._call_bytes_per_row: float | None = None  # measured once, on the first exact solve
        prepare(model)

    def recompute(self, xt: torch.Tensor) -> bool:
        """Exact gradients: recompute network calls in backward only when a plain graph of this
        solve would not fit graph_budget (solvers.plain_graph_fits); the gradient is the same."""
        if self._call_bytes_per_row is None:
            self._call_bytes_per_row = graph_bytes(self.model.score, xt, self.t_star) / xt.shape[0]
        state = xt[0].numel() * xt.element_size()
        return not plain_graph_fits(self.model, self.solver, self.steps, xt.shape[0], self._call_bytes_per_row,
                                    state, self.graph_budget)

    @property
    def deterministic(self) -> bool:
        """No noise: every run from the same input gives the same output (PF-ODE solvers,
        dpm-solver-2m, ddim at eta = 0, and one ddpm step: the x0 prediction)."""
        return (self.solver in DETERMINISTIC or (self.solver == "ddim" and self.eta == 0.0)
                or (self.solver == "ddpm" and self.steps == 1))

    def forward(self, x, seed: int, streams: Streams | None = None):
        """`streams` addresses each row's noise (brownian.Streams); None: one plain solve."""
        xt = self.ab ** 0.5 * (2 * x - 1)
        recompute = self.grad != "exact" or not torch.is_grad_enabled() or self.recompute(xt)
        x0 = solve(self.model, xt, self.t_star, self.steps, seed, self.solver, grad=self.grad,
                   adjoint_method=self.adjoint_method, eta=self.eta, rng=self.rng, streams=streams,
                   precision=self.precision, recompute=recompute)
        return (x0.clamp(-1, 1) + 1) / 2


def majority_vote(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (B, K) -> (B,): most frequent, ties to the lowest class index."""
    counts = nn.functional.one_hot(labels, num_classes).sum(1)
    return counts.argmax(1)  # argmax returns the first maximal index


def vote_decided(counts: torch.Tensor, remaining: int) -> torch.Tensor:
    """(B, classes) vote counts with `remaining` votes still to come -> (B,) bool: True where
    majority_vote's winner can no longer change. The hardest case for the leader is every
    remaining vote going to one challenger c; c would win with more votes, or as many and a
    lower class index (the tie rule)."""
    lead = counts.argmax(1, keepdim=True)
    lead_count = counts.gather(1, lead)
    classes = torch.arange(counts.shape[1], device=counts.device)[None]
    reach = counts + remaining
    overtakes = (reach > lead_count) | ((reach == lead_count) & (classes < lead))
    overtakes &= classes != lead
    return ~overtakes.any(1)


def votes_to_decide(counts: torch.Tensor, remaining: int) -> torch.Tensor:
    """(B,) the fewest further votes after which each vote could be decided: all of them going to
    the current leader. No vote is decided sooner, so evaluating this many before looking again
    costs no network call a one-at-a-time vote would not make."""
    lead = counts.argmax(1, keepdim=True)
    lead_count = counts.gather(1, lead)
    classes = torch.arange(counts.shape[1], device=counts.device)[None]
    # challenger c stays behind after j more votes for the leader iff
    # c + remaining - j < lead + j, or equal and c has the higher index
    gap = counts + remaining - lead_count
    need = torch.where(classes > lead, (gap + 1) // 2, gap // 2 + 1)
    need = torch.where(classes == lead, torch.zeros_like(need), need)
    return need.max(1).values.clamp(1, max(remaining, 1))


class PurifiedClassifier(nn.Module):
    """Base classifier for smoothing: purify each input `votes` times, classify, vote.

    Run k of input b (k < votes) is addressed by brownian.Streams: its noise is row b of stream k,
    so it gets the same Brownian path (or ancestral noise) whether or not it is evaluated.
    early_stop (default): evaluate the runs in chunks and stop an input's vote as soon as its
    winner can no longer change (vote_decided); the predicted labels are those of the full vote.
    Chunks are sized by votes_to_decide, so no run is evaluated that a one-run-at-a-time vote
    would have skipped; with a deterministic purifier all runs are the same, so one is evaluated.
    precision: autocast of the classifier (see precision.py)."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module, num_classes: int, votes: int = 1,
                 early_stop: bool = True, precision: str = "fp32"):
        super().__init__()
        if votes < 1:
            raise SdepureError(f"votes must be >= 1, got {votes}")
        check_precision(precision)
        self.purifier, self.classifier = purifier, classifier
        self.num_classes, self.votes = num_classes, int(votes)
        self.early_stop, self.precision = bool(early_stop), precision
        prepare(classifier)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return _run_net(self.classifier, x, precision=self.precision)

    def run_logits(self, x: torch.Tensor, seed: int, runs, draws=None) -> torch.Tensor:
        """(len(runs), len(draws), classes) logits of runs `runs` of inputs `draws` (default all)
        of the batch x; each run addressed as in the class docstring."""
        draws = list(range(x.shape[0])) if draws is None else list(draws)
        runs = list(runs)
        streams = Streams.blocks(runs, draws, x.shape[0])
        xs = x if len(draws) == x.shape[0] else x[to_device(torch.tensor(draws), x.device)]
        xr = xs.repeat(len(runs), *([1] * (x.dim() - 1)))
        logits = self.classify(self.purifier(xr, seed, streams=streams))
        return logits.reshape(len(runs), len(draws), -1)

    def vote_logits(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """(B, K, classes) logits of the K purified copies of each input (all runs evaluated)."""
        if self.votes == 1:
            return self.classify(self.purifier(x, seed))[:, None]
        return self.run_logits(x, seed, range(self.votes)).transpose(0, 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.votes == 1 or not self.early_stop:
            return majority_vote(self.vote_logits(x, seed).argmax(-1), self.num_classes)
        if getattr(self.purifier, "deterministic", False):  # K equal labels: their vote is the label
            return self.run_logits(x, seed, [0])[0].argmax(-1)
        counts = torch.zeros(x.shape[0], self.num_classes, dtype=torch.long)
        active, done = torch.arange(x.shape[0]), 0
        while len(active):
            chunk = int(votes_to_decide(counts[active], self.votes - done).min())
            labels = self.run_logits(x, seed, range(done, done + chunk), active.tolist()).argmax(-1).cpu()
            counts[active] += nn.functional.one_hot(labels, self.num_classes).sum(0)
            done += chunk
            active = active[~vote_decided(counts[active], self.votes - done)]
        return counts.argmax(1).to(x.device)


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
        return OneShot(model, t_star, precision=settings.precision)
    return ReverseProcess(model, t_star, settings.steps, settings.solver, grad, settings.adjoint_method,
                          eta=settings.eta, rng=settings.rng, precision=settings.precision)


def build(settings: Purifier, model: DiffusionModel | None, classifier: nn.Module,
          num_classes: int) -> PurifiedClassifier:
    """The purified base classifier for certification (no gradients)."""
    return PurifiedClassifier(build_purifier(settings, model), classifier, num_classes, settings.votes,
                              early_stop=settings.early_stop, precision=settings.precision)
