"""The defense, defined once: purify with a diffusion model, classify, vote. Certification (as
the base classifier of smoothing), every attack, DiffAttack and fixed randomness run this class.

| method    | purifier                                   | votes |
| none      | identity                                   | 1     |
| carlini   | one-shot x0 prediction at t*               | 1     |
| diffpure  | one reverse-process solve from t*          | 1     |
| densepure | K reverse solves with different noise      | K     |

Scaling. Images are in [0, 1] and the model works in [-1, 1], so noise sigma on images is 2 sigma
for the model: x_t* = sqrt(alpha_bar(t*)) (2 x_noisy - 1) is exactly a forward-diffused sample at
t* when x_noisy = x + sigma z and alpha_bar(t*) = 1 / (1 + 4 sigma^2). Certification hands in
x_noisy (smoothing.Smooth draws that noise); an attack hands in clean x, and the defense draws
the forward noise itself (`diffuse`).

Noise. Every row's draws are addressed by brownian.Streams and made by one rng.Draws object (the
settings' `rng`), bound here. A call on clean inputs addressed by `streams` takes its forward
noise from streams.derive(Draw.FORWARD) and its reverse paths from streams.derive(Draw.PATH).

K-run layout. Run k of every input, run-major (row k B + b); all K runs of an input start from the
same x_t*, as DensePure purifies one noisy input K times. Run k of input b always gets the same
path (Streams.runs), so an early-stopped vote gives the full vote's labels.

Vote: the most frequent label wins; among tied labels, the lowest class index.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn

from . import precision
from .brownian import GridBrownian, RowNoise, Streams
from .errors import SdepureError
from .models.base import DiffusionModel, with_precision
from .rng import Draw, Draws
from .schedules import DiscreteVP, sigma_for_alpha_bar
from .sde import network_call
from .settings import REVERSE_METHODS, Purifier
from .solvers import CALLS_PER_STEP, EXACT_GRAPH_BUDGET, Sampler, graph_bytes, has_step_variance, plain_graph_fits, solve

DEFAULT_T_RULE = {"carlini": "first", "diffpure": "nearest", "densepure": "nearest"}


def t_star_for(schedule, sigma: float, method: str, rule: str | None = None) -> float:
    if isinstance(schedule, DiscreteVP):
        return schedule.t_star(sigma, rule or DEFAULT_T_RULE.get(method, "nearest"))
    return schedule.t_star(sigma)


def resolve_t_star(settings: Purifier, schedule) -> float:
    """t* given directly, or the time whose noise level matches sigma on this schedule."""
    if settings.t_star is not None:
        return settings.t_star
    return t_star_for(schedule, settings.sigma, settings.method, settings.t_rule)


def resolve_variance(variance: str, model: DiffusionModel, solver: str) -> str | None:
    """auto: the model's learned variance for ddpm steps where it has one (as DensePure ran its
    checkpoints), the posterior variance for other ddpm steps, and None (nothing to choose) for
    the other solvers."""
    if variance == "auto":
        if not has_step_variance(solver):
            return None
        return "learned" if model.has_variance else "posterior"
    if variance == "learned" and not model.has_variance:
        raise SdepureError("variance learned needs a diffusion model with a variance output (a learned-sigma "
                           "checkpoint such as DensePure's ADM models); this one has none: use auto, posterior or beta")
    return variance


def majority_vote(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (B, K) -> (B,): most frequent, ties to the lowest class index."""
    counts = nn.functional.one_hot(labels, num_classes).sum(1)
    return counts.argmax(1)  # argmax returns the first maximal index


def vote_decided(counts: torch.Tensor, remaining) -> torch.Tensor:
    """(B, classes) vote counts with `remaining` votes still to come (an int, or one per vote) ->
    (B,) bool: True where majority_vote's winner can no longer change. The hardest case for the
    leader is every remaining vote going to one challenger c; c would win with more votes, or as
    many and a lower class index (the tie rule)."""
    remaining = torch.as_tensor(remaining).reshape(-1, 1)
    lead = counts.argmax(1, keepdim=True)
    lead_count = counts.gather(1, lead)
    classes = torch.arange(counts.shape[1], device=counts.device)[None]
    reach = counts + remaining
    overtakes = (reach > lead_count) | ((reach == lead_count) & (classes < lead))
    overtakes &= classes != lead
    return ~overtakes.any(1)


def votes_to_decide(counts: torch.Tensor, remaining) -> torch.Tensor:
    """(B,) the fewest further votes after which each vote could be decided: all of them going to
    the current leader (`remaining` as in vote_decided). No vote is decided sooner, so evaluating
    this many before looking again costs no network call a one-at-a-time vote would not make."""
    remaining = torch.as_tensor(remaining).reshape(-1, 1)
    lead = counts.argmax(1, keepdim=True)
    lead_count = counts.gather(1, lead)
    classes = torch.arange(counts.shape[1], device=counts.device)[None]
    # challenger c stays behind after j more votes for the leader iff
    # c + remaining - j < lead + j, or equal and c has the higher index
    gap = counts + remaining - lead_count
    need = torch.where(classes > lead, (gap + 1) // 2, gap // 2 + 1)
    need = torch.where(classes == lead, torch.zeros_like(need), need)
    return torch.minimum(need.max(1).values.clamp_min(1), remaining[:, 0].clamp_min(1))


class VoteCost(NamedTuple):
    """Seconds of one solve of `rows` rows: per_solve + per_row x rows."""
    per_solve: float
    per_row: float


def early_vote(labels_of, batch: int, votes: int, num_classes: int, cost: VoteCost):
    """The early-stopped vote in rounds, one solve each. labels_of(inputs, runs) -> (len,) the
    labels of run runs[j] of input inputs[j]. In each round every undecided input evaluates either
    its votes_to_decide next runs (none that a one-at-a-time vote would skip) or all its remaining
    runs: the former only while the rows it could skip, were every input decided by it, cost more
    than the further solve it entails (per_row x rows > per_solve). Returns (counts (batch,
    classes), rows evaluated, solves)."""
    counts = torch.zeros(batch, num_classes, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.long)
    active, rows, solves = torch.arange(batch), 0, 0
    while len(active):
        left = votes - done[active]
        take = votes_to_decide(counts[active], left)
        if cost.per_row * float((left - take).sum()) <= cost.per_solve:
            take = left
        inputs = active.repeat_interleave(take)
        first = (take.cumsum(0) - take).repeat_interleave(take)
        runs = done[inputs] + torch.arange(len(inputs)) - first
        counts.index_put_((inputs, labels_of(inputs, runs).cpu()), torch.ones_like(inputs), accumulate=True)
        done[active] += take
        rows, solves = rows + len(inputs), solves + 1
        active = active[~vote_decided(counts[active], votes - done[active])]
    return counts, rows, solves


class Outputs(NamedTuple):
    """One draw of the defense on a batch of clean inputs."""
    logits: torch.Tensor            # (B, C) what an attack differentiates (DensePure: the K runs' mean)
    dev: torch.Tensor | None        # (B,) DiffAttack's deviated-reconstruction loss, when asked for
    labels: torch.Tensor            # (B,) the defense's own prediction (DensePure: the vote)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x repeated k times, run-major."""
    return x if k == 1 else x.repeat(k, *([1] * (x.dim() - 1)))


class Defense(nn.Module):
    """`settings` (validated, sdepure.settings.Purifier) over a diffusion model and a classifier.
    The networks run at `settings.precision` (bound here, see precision.py); `draws` makes every
    Gaussian draw (default: the settings' rng stream; tests pass their own)."""

    def __init__(self, settings: Purifier, model: DiffusionModel | None, classifier: nn.Module,
                 num_classes: int, draws: Draws | None = None):
        super().__init__()
        self.settings, self.method, self.votes = settings, settings.method, settings.votes
        self.num_classes = int(num_classes)
        self.draws = draws if draws is not None else Draws(settings.rng)
        self.classifier = precision.with_precision(precision.prepare(classifier), settings.precision)
        self.model, self.t_star, self.sigma, self.sampler = None, None, None, None
        if self.method != "none":
            if model is None:
                raise SdepureError(f"method {self.method} needs a diffusion model")
            self.t_star = resolve_t_star(settings, model.schedule)
            self.alpha_bar = float(model.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)))
            self.sigma = sigma_for_alpha_bar(self.alpha_bar)  # forward noise to t* on the [0, 1] scale
            if self.method in REVERSE_METHODS:
                self.sampler = Sampler(settings.solver, settings.steps, settings.eta,
                                       resolve_variance(settings.variance, model, settings.solver),
                                       settings.adjoint_method)
            self.model = with_precision(precision.prepare(model), settings.precision)
        self.graph_budget = EXACT_GRAPH_BUDGET
        self.vote_cost: VoteCost | None = None  # the early-stopped vote's cost model; None: measure it
        self._call_bytes_per_row: float | None = None  # measured once, on the first exact solve
        # score-network calls (rows fed to the network) so far: what a certificate costs
        # (ode-dopri5 adapts its steps and is counted as one call per step)
        self.network_calls = 0
        self._calls_per_row = 0 if self.model is None else 1 if self.sampler is None else (
            CALLS_PER_STEP.get(self.sampler.method, 1) * len(self.sampler.times(self.model.schedule, self.t_star)))

    @property
    def calls_per_draw(self) -> int:
        """Score-network calls one noise draw costs with the full vote (K runs)."""
        return self._calls_per_row * self.votes

    @property
    def resolved(self) -> dict:
        """What settings that depend on the model came to mean here (variance auto): recorded with
        a run, so that a resume under another meaning is refused."""
        return {"variance": self.sampler.variance if self.sampler is not None else None}

    @property
    def deterministic(self) -> bool:
        """Every run from the same input gives the same output."""
        return self.sampler is None or self.sampler.deterministic

    # -- purification ----------------------------------------------------------------------

    def x_t_star(self, x_noisy: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar ** 0.5 * (2 * x_noisy - 1)

    def solver_grad(self, xt: torch.Tensor) -> str | None:
        """The solver's gradient mode. Exact gradients recompute network calls in backward only
        when a plain graph of this solve would not fit graph_budget (solvers.plain_graph_fits);
        the gradient is the same either way."""
        grad = self.settings.solver_grad
        if grad != "exact":
            return grad
        if not torch.is_grad_enabled():
            return None
        if self._call_bytes_per_row is None:
            self._call_bytes_per_row = graph_bytes(self.model.score, xt, self.t_star) / xt.shape[0]
        state = xt[0].numel() * xt.element_size()
        fits = plain_graph_fits(self.model, self.sampler.method, self.sampler.steps, xt.shape[0],
                                self._call_bytes_per_row, state, self.graph_budget)
        return None if fits else "exact"

    def purify(self, x_noisy: torch.Tensor, streams: Streams | None = None, states: bool = False):
        """Rows of x_noisy ([0, 1], carrying noise of level sigma) -> purified images in [0, 1];
        `streams` addresses each row's reverse path (a deterministic purifier needs none).
        states=True (diffpure, densepure): also the solver's states after every step and their
        times, (purified, states, times)."""
        if self.method == "none":
            return x_noisy
        self.network_calls += x_noisy.shape[0] * self._calls_per_row
        xt = self.x_t_star(x_noisy)
        if self.method == "carlini":
            out = network_call(self.model.x0, xt, self.t_star)
        else:
            noise = None
            if not self.sampler.deterministic:
                if streams is None:
                    raise SdepureError(f"the {self.sampler.method} solver draws noise: pass the rows' Streams")
                noise = GridBrownian(streams, xt.shape, xt.dtype, xt.device, self.draws)
            out = solve(self.model, xt, self.t_star, self.sampler, noise, self.solver_grad(xt), states)
            if states:
                out, traj, times = out
                return (out.clamp(-1, 1) + 1) / 2, traj, times
        return (out.clamp(-1, 1) + 1) / 2

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    # -- certification: the base classifier of smoothing, on noisy inputs --------------------

    def run_logits(self, x_noisy: torch.Tensor, streams: Streams, runs) -> torch.Tensor:
        """(len(runs), B, classes): the logits of runs `runs` of every row of x_noisy."""
        runs = list(runs)
        purified = self.purify(_rows(x_noisy, len(runs)), streams.runs(runs, self.votes))
        return self.classify(purified).reshape(len(runs), x_noisy.shape[0], -1)

    def logits(self, x_noisy: torch.Tensor, streams: Streams) -> torch.Tensor:
        """(B, classes) the differentiable counterpart of predict: the mean of the K runs' logits
        of noisy inputs (what an attack differentiates, as in forward), graph as solver_grad says."""
        return self.run_logits(x_noisy, streams, range(self.votes)).mean(0)

    def pair_labels(self, x_noisy: torch.Tensor, streams: Streams, inputs: torch.Tensor,
                    runs: torch.Tensor) -> torch.Tensor:
        """(len(inputs),) the labels of run runs[j] of row inputs[j] of x_noisy, in one solve. Each
        pair draws from the address run_logits gives it, whatever else is evaluated with it."""
        by_run = [streams.take(inputs[runs == k].tolist()).runs([k], self.votes) for k in runs.unique().tolist()]
        paths = Streams(sum((p.seed for p in by_run), ()), sum((p.row for p in by_run), ()), streams.width)
        order = torch.argsort(runs, stable=True)  # the pairs in by_run's order
        labels = self.classify(self.purify(x_noisy[inputs[order].to(x_noisy.device)], paths)).argmax(-1)
        return torch.empty_like(labels).index_copy_(0, order.to(labels.device), labels)

    def _timed_full_vote(self, x_noisy: torch.Tensor, streams: Streams) -> torch.Tensor:
        """(K, B) the labels of all runs in one solve, and the cost model measured on it: a solve of
        one row (after one to warm up) gives per_solve + per_row; this solve gives the rest. The
        only place a GPU is synchronised to read a clock."""
        def seconds(x, s, runs):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            labels = self.run_logits(x, s, runs).argmax(-1).cpu()  # on the host: the solve has ended
            return labels, time.perf_counter() - start

        one = min(seconds(x_noisy[:1], streams.take([0]), [0])[1] for _ in range(2))
        labels, full = seconds(x_noisy, streams, range(self.votes))
        per_row = max(full - one, 0.0) / max(labels.numel() - 1, 1)
        self.vote_cost = VoteCost(max(one - per_row, 0.0), per_row)
        return labels

    @torch.no_grad()
    def predict(self, x_noisy: torch.Tensor, address) -> torch.Tensor:
        """(B,) labels: the vote over the K runs of each noisy input. `address`: an int seed (one
        block of the batch) or Streams. With settings.early_stop an input's vote stops as soon as
        its winner can no longer change (early_vote), in rounds chosen from the cost model
        `vote_cost`, measured on the first vote (which evaluates all runs at once) unless set; a
        deterministic purifier votes with one run. The labels are the full vote's whatever the
        rounds: run k of an input always has the same noise. The rounds, and so the network calls,
        follow the measured costs and can differ between machines and runs."""
        streams = Streams.batch(address, x_noisy.shape[0]) if isinstance(address, int) else address
        if self.votes == 1 or not self.settings.early_stop:
            logits = self.run_logits(x_noisy, streams, range(self.votes))
            return majority_vote(logits.argmax(-1).T, self.num_classes)
        if self.deterministic:  # K equal labels: their vote is the label
            return self.run_logits(x_noisy, streams, [0])[0].argmax(-1)
        if self.vote_cost is None:
            labels = self._timed_full_vote(x_noisy, streams)
            return majority_vote(labels.T, self.num_classes).to(x_noisy.device)
        counts, _, _ = early_vote(lambda i, k: self.pair_labels(x_noisy, streams, i, k),
                                  x_noisy.shape[0], self.votes, self.num_classes, self.vote_cost)
        return counts.argmax(1).to(x_noisy.device)

    # -- attacks: one draw of the defense on clean inputs ------------------------------------

    def diffuse(self, x: torch.Tensor, streams: Streams) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x + sigma z, z): clean x in [0, 1] diffused to t*, z addressed by `streams`."""
        if self.method == "none":
            return x, None
        z = RowNoise(streams, x.shape[1:], self.draws, x.device, x.dtype).draw()
        return x + self.sigma * z, z

    def purified(self, x: torch.Tensor, streams: Streams, with_dev: bool = False):
        """(purified rows (K B, ...) in the K-run layout, each row's L_dev or None) for clean x,
        differentiable as settings.grad says (bpda: the identity in backward)."""
        x_noisy, z = self.diffuse(x, streams.derive(Draw.FORWARD))
        if self.method == "none":
            return x, None
        k = self.votes
        paths = streams.derive(Draw.PATH).runs(range(k), k)
        xr = _rows(x_noisy, k)
        if self.settings.grad == "bpda":
            with torch.no_grad():
                out = self.purify(xr, paths)
            clean = _rows(x, k)
            return clean + (out - clean).detach(), None
        if not with_dev:
            return self.purify(xr, paths), None
        if self.sampler is None:
            raise SdepureError(f"method {self.method} has no reverse process, so no intermediate states")
        out, traj, times = self.purify(xr, paths, states=True)
        return out, self.deviation(_rows(x, k), _rows(z, k), traj, times)

    def deviation(self, x: torch.Tensor, z: torch.Tensor, states: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """DiffAttack's deviated-reconstruction loss per row: the mean over the solver's steps of
        the mean squared difference (model scale) between the reverse state x'_t and the diffusion
        sample x_t = sqrt(alpha_bar(t)) (2 x - 1) + sqrt(1 - alpha_bar(t)) z, z being the
        defense's own forward draw (so x_t* is exactly the purifier's input)."""
        ab = self.model.schedule.alpha_bar(times)
        ab[times == 0] = 1.0
        shape = (-1, *([1] * x.dim()))
        a = ab.sqrt().to(x.dtype).to(x.device).reshape(shape)
        s = (1 - ab).clamp_min(0).sqrt().to(x.dtype).to(x.device).reshape(shape)
        forward = a * (2 * x - 1) + s * z  # (n, rows, ...): the diffusion process at the states' times
        return (states - forward).pow(2).flatten(2).mean(-1).mean(0)

    def forward(self, x: torch.Tensor, streams: Streams, with_dev: bool = False) -> Outputs:
        """One draw of the defense on clean inputs x ([0, 1]), addressed per input by `streams`."""
        out, dev = self.purified(x, streams, with_dev)
        k, b = self.votes, x.shape[0]
        logits = self.classify(out).reshape(k, b, -1)
        labels = majority_vote(logits.detach().argmax(-1).T, self.num_classes)
        dev = dev.reshape(k, b).mean(0) if dev is not None else None
        return Outputs(logits.mean(0), dev, labels)

    @torch.no_grad()
    def predict_clean(self, x: torch.Tensor, streams: Streams) -> torch.Tensor:
        """forward(x, streams).labels, with predict's early-stopped vote."""
        x_noisy, _ = self.diffuse(x, streams.derive(Draw.FORWARD))
        if self.method == "none":
            return self.classify(x).argmax(-1)
        return self.predict(x_noisy, streams.derive(Draw.PATH))
