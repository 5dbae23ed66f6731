"""DiffAttack (Kang, Song & Li, NeurIPS 2023) and the deterministic white-box setting (Liu et al.,
ICLR 2025) on a purified classifier (sdepure.attacks.AttackedModel over sdepure.defense.Defense,
which also computes L_dev from the solver's intermediate states).

DiffAttack maximises L = L_cls + lambda L_dev with an APGD-style loop (their Algorithm 2):
- L_cls: cross-entropy in the first round, DLR (Croce & Hein 2020) in the second;
- L_dev, the deviated-reconstruction loss, E_t[alpha(t) E d(x_t, x'_t)]: x'_t is the state of
  the reverse process at time t and x_t the sample of the diffusion process at the same time. The
  paper's defaults: lambda = 1, alpha(t) = 1 / (number of time steps used), steps spread
  uniformly over [0, t*]. Here every step of the solver's grid is used (the expectation over t is
  exact on the grid rather than sampled), d is the mean squared difference per coordinate on
  the model's [-1, 1] scale (the paper leaves d open; per coordinate keeps lambda = 1 meaningful
  at every image size), and x_t = sqrt(alpha_bar(t)) (2 x - 1) + sqrt(1 - alpha_bar(t)) z uses
  the defense's own forward draw z, so x_t* is exactly the purifier's input and L_dev measures
  how far the reverse trajectory drifts from the forward one (the expectation over (x_t, x'_t)
  is the EOT average over draws).
- optimiser: 100 iterations, momentum 0.75, step size 2 eps halved at APGD's checkpoints,
  20 EOT draws, every example optimised in every iteration (including ones already
  misclassified: one wrong draw of a randomized defense does not make the example broken); kept:
  the iterate with the largest share of wrong EOT draws, then the largest loss (apgd_round).
- gradients: --grad exact (solvers recompute segments of sqrt(steps) steps: constant memory
  in the spirit of the paper's segment-wise forwarding-backwarding) or --grad adjoint: torchsde's
  adjoint with an output time at every step resets its state to the stored forward state there
  and adds that state's loss gradient to the adjoint, so L_dev flows through the adjoint with
  memory for the states only. What the adjoint cannot give: exact gradients for its
  discretisation (Euler: order 1/2 with the per-step resets; exact up to rounding only for
  reversible_heun), and the ddpm, ddim and dpm-solver-2m samplers have no adjoint. BPDA has no gradient through the states, so DiffAttack
  refuses it, as it refuses purifiers without a reverse process (none, carlini).

Fixed randomness (FixedRandomness): each example's forward noise z and Brownian paths are
fixed, addressed by (seed, example index), and known to the attacker, who attacks and is
evaluated with the same randomness: the defense becomes a deterministic function per example.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from . import settings
from .attacks import NORMS, AttackedModel, _project, eot_gradient
from .brownian import Streams
from .defense import Defense, Outputs
from .errors import SdepureError
from .rng import Optimise, derive_seed, generator

CLS_LOSSES = ("ce", "dlr")


def check_diffattack(target) -> None:
    settings.check_diffattack(target.defense.settings)


def _distances(x: torch.Tensor, anchors: torch.Tensor, norm: str) -> torch.Tensor:
    diff = x.reshape(x.shape[0], 1, -1) - anchors.reshape(1, anchors.shape[0], -1).to(x.device)
    return diff.abs().amax(-1) if norm == "Linf" else diff.norm(dim=-1)


def check_disjoint_balls(anchors: torch.Tensor, ids, eps: float, norm: str) -> None:
    """FixedRandomness tells examples apart by their eps-balls: refuse examples 2 eps or closer."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        return
    d = _distances(anchors, anchors, norm)
    d.fill_diagonal_(float("inf"))
    gap = float(d.min())
    if not gap > 2 * eps:
        i, j = divmod(int(d.argmin()), len(ids))
        raise SdepureError(f"--fixed-randomness tells examples apart by their eps-balls, but examples "
                           f"{ids[i]} and {ids[j]} are {gap:.4g} apart ({norm}), not more "
                           f"than 2 eps = {2 * eps:.4g}; attack them in separate runs")


class FixedRandomness(nn.Module):
    """The deterministic white-box defense (Liu et al., ICLR 2025): example i always gets the
    draws addressed by derive_seed(seed, i) (its forward noise and Brownian paths, see
    Defense.forward), whatever batch it runs in, and the attacker knows them.

    Queries (from any attack, AutoAttack included) are matched to their example by the nearest
    clean input in the attack's norm; this is unambiguous because every query lies in its
    example's eps-ball and the balls are checked to be disjoint (clean inputs > 2 eps apart)."""

    def __init__(self, defense: Defense, anchors: torch.Tensor, ids, seed: int, eps: float,
                 norm: str = "Linf"):
        super().__init__()
        if norm not in NORMS:
            raise SdepureError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
        self.defense, self.norm, self.eps = defense, norm, float(eps)
        for p in defense.parameters():  # frozen, as AttackedModel freezes them: input gradients only
            p.requires_grad_(False)
        self.anchors = anchors.detach()
        self.ids = [int(i) for i in ids]
        self.seeds = [derive_seed(seed, i) for i in self.ids]
        check_disjoint_balls(self.anchors, self.ids, self.eps, self.norm)

    @property
    def num_classes(self) -> int:
        return self.defense.num_classes

    def _distances(self, x: torch.Tensor) -> torch.Tensor:
        return _distances(x, self.anchors, self.norm)

    def streams(self, x: torch.Tensor) -> Streams:
        """Each query's address: its example's own seed (a block of width 1)."""
        with torch.no_grad():
            nearest = self._distances(x.detach()).argmin(1).tolist()
        return Streams.per_row(self.seeds[j] for j in nearest)

    def outputs(self, x: torch.Tensor, with_dev: bool = False) -> Outputs:
        return self.defense(x, self.streams(x), with_dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x).logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The defense's prediction under the fixed randomness (`seed` is ignored: every draw is
        the same)."""
        return self.defense.predict_clean(x, self.streams(x))


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference of logits ratio (untargeted), per row, to be maximised:
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)."""
    if logits.shape[1] < 3:
        raise SdepureError("the DLR loss needs at least 3 classes")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return -(z_y - other.max(1).values) / (top[:, 0] - top[:, 2] + 1e-12)


def cls_loss(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "ce":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    if kind == "dlr":
        return dlr_loss(logits, y)
    raise SdepureError(f"unknown classification loss {kind!r}; choose from {', '.join(CLS_LOSSES)}")


def apgd_checkpoints(iters: int) -> list[int]:
    """APGD's checkpoints (Croce & Hein 2020): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); iteration ceil(p_j iters)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * iters - 1e-9) for q in p[1:] if q < 1})


def _step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return grad.sign()
    g = grad.reshape(grad.shape[0], -1)
    return (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)


def _in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projection onto the eps-ball around x, then onto the image box (which stays in the ball)."""
    return (x + _project(x_adv - x, eps, norm)).clamp(0, 1)


def apgd_round(loss_and_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               x: torch.Tensor,
               eps: float, norm: str, iters: int, momentum: float = 0.75, seed: int = 0,
               progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffAttack's Algorithm 2 (APGD with momentum, step 2 eps halved at the checkpoints) for
    one loss; loss_and_grad(x_adv) returns the per-example (EOT-averaged) loss, its gradient and
    the share of the EOT draws the defense got wrong. Starts from a uniformly random point of the
    ball (APGD's start); every example is updated in every iteration. Returns per example the
    iterate with the largest share of wrong draws, ties to the largest loss (Algorithm 2 keeps
    the largest loss; with L_dev in the loss that can be an iterate the defense gets right, so
    misclassification ranks first, as APGD keeps its successful iterates), and that loss.
    """
    u = torch.rand(x.shape, generator=generator(seed), dtype=x.dtype).to(x.device)
    x_k = _in_ball(x, x + _project((2 * u - 1) * eps, eps, norm), eps, norm)
    eta = torch.full((x.shape[0],) + (1,) * (x.dim() - 1), 2 * eps, dtype=x.dtype, device=x.device)
    checkpoints = set(apgd_checkpoints(iters))
    loss, grad, wrong = loss_and_grad(x_k)
    if progress:
        progress(1)
    best, best_loss, best_wrong = x_k.clone(), loss.clone(), wrong.clone()
    x_prev = x_k
    x_k = _in_ball(x, x_k + eta * _step(grad, norm), eps, norm)
    for k in range(1, iters):
        loss, grad, wrong = loss_and_grad(x_k)
        better = (wrong > best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        # torch.where, not masked assignment: no device-to-host sync on a GPU
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_k, best)
        best_loss, best_wrong = torch.where(better, loss, best_loss), torch.where(better, wrong, best_wrong)
        if progress:
            progress(1)
        if k == iters - 1:
            break
        z = _in_ball(x, x_k + eta * _step(grad, norm), eps, norm)
        x_next = _in_ball(x, x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_prev), eps, norm)
        x_prev, x_k = x_k, x_next
        if k in checkpoints:
            eta = eta / 2
    return best, best_loss


def diffattack(target: AttackedModel | FixedRandomness, x: torch.Tensor, y: torch.Tensor, eps: float,
               norm: str = "Linf", iters: int = 100, eot: int = 20, eot_batch: int | None = None,
               dev_weight: float = 1.0, losses=CLS_LOSSES, seed: int = 0, select_draws: int | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """DiffAttack on the examples x (in [0, 1]) with labels y: one APGD round per classification
    loss in `losses` on L_cls + dev_weight * L_dev, gradients averaged over `eot` draws run
    `eot_batch` draws at a time as rows (default: all at once). With a FixedRandomness target the
    defense's randomness is the example's fixed one (the gradient is then exact and eot should
    be 1). Each example keeps the round whose result the defense gets right least often over
    `select_draws` fresh draws (default eot; one under fixed randomness; ties to the earlier
    round)."""
    check_diffattack(target)
    if norm not in NORMS:
        raise SdepureError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    eot_batch = eot if eot_batch is None else eot_batch
    if eps < 0 or iters < 1 or eot < 1 or eot_batch < 1 or not dev_weight >= 0:
        raise SdepureError("need eps >= 0, iterations >= 1, eot >= 1, eot batch >= 1 and a deviation weight >= 0")
    for kind in losses:
        cls_loss(kind, torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))  # validates the name
    x, y = x.detach(), y.detach()
    select_draws = eot if select_draws is None else select_draws

    def make_loss(kind: str):
        def loss_and_grad(x_adv: torch.Tensor):
            wrong = torch.zeros(len(y), dtype=x.dtype, device=x.device)

            def rows_loss(rows: torch.Tensor) -> torch.Tensor:
                nonlocal wrong
                yr = y.repeat(rows.shape[0] // len(y))
                logits, dev, labels = target.outputs(rows, dev_weight > 0)
                wrong = wrong + (labels != yr).to(x.dtype).reshape(-1, len(y)).sum(0)
                loss = cls_loss(kind, logits, yr)
                return loss + dev_weight * dev if dev is not None else loss

            mean, grad = eot_gradient(rows_loss, x_adv, eot, eot_batch)
            return mean, grad, wrong / eot
        return loss_and_grad

    rounds, info = [], {"losses": list(losses), "final_loss": {}}
    for r, kind in enumerate(losses):
        best, best_loss = apgd_round(make_loss(kind), x, eps, norm, iters, seed=derive_seed(seed, r),
                                     progress=progress)
        rounds.append(best)
        info["final_loss"][kind] = best_loss.tolist()
    wrong = torch.stack([_wrong_counts(target, xa, y, select_draws, derive_seed(seed, Optimise.SELECT, r))
                         for r, xa in enumerate(rounds)])  # (rounds, B)
    pick = wrong.argmax(0)  # first maximum: ties to the earlier round
    x_adv = torch.stack(rounds)[pick, torch.arange(len(x))]
    info["round_kept"] = [losses[i] for i in pick.tolist()]
    return x_adv.detach(), info


@torch.no_grad()
def _wrong_counts(target, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    draws = 1 if isinstance(target, FixedRandomness) else draws
    return sum((target.predict(x, derive_seed(seed, d)) != y).long() for d in range(draws))
