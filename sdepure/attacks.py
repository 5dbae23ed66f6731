"""Adaptive attacks on purified classifiers: gradient modes, PGD-EOT, BPDA+EOT, AutoAttack,
and the scoring of a randomized defense over many purifications.

What the attack differentiates and what the defense predicts (sdepure.defense.Defense, the one
definition of the defense): DiffPure, the classifier's logits on one purification; DensePure, the
mean of the K purifications' logits (the defense itself predicts by majority vote, which has no
gradient); Carlini, the logits on the one-shot x0 prediction of a freshly noised input; none,
the classifier. Every call draws fresh randomness.

Gradient modes (through the reverse process):
- exact:   autograd through every solver step, the network and segments of sqrt(steps) steps
           recomputed in backward (solvers.reverse_sde), so memory hardly grows with steps;
- adjoint: torchsde.sdeint_adjoint (or torchdiffeq.odeint_adjoint for ODE solvers) on the same
           time grid and Brownian path; with reversible_heun the adjoint is exact up to rounding;
- bpda:    the purifier is the identity in the backward pass (DiffPure's BPDA);
- ode:     purify with the probability-flow ODE and differentiate with torchdiffeq.odeint_adjoint.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .brownian import Streams
from .defense import Defense, Outputs, majority_vote
from .errors import SdepureError
from .rng import derive_seed, generator
from .settings import NORMS


class AttackedModel(nn.Module):
    """A Defense as an nn.Module from [0, 1] images to logits, differentiable through the purifier
    as the settings' grad says. Every call is a fresh draw of the randomized defense: call c is
    addressed by derive_seed(seed, c) (one block of its batch); `reset(seed)` restarts the
    sequence. The networks' weights are frozen."""

    def __init__(self, defense: Defense, seed: int = 0):
        super().__init__()
        self.defense = defense
        for p in self.parameters():
            p.requires_grad_(False)
        self.reset(seed)

    @property
    def num_classes(self) -> int:
        return self.defense.num_classes

    def reset(self, seed: int) -> None:
        self.seed, self.calls = int(seed), 0

    def next_seed(self) -> int:
        self.calls += 1
        return derive_seed(self.seed, self.calls)

    def outputs(self, x: torch.Tensor, with_dev: bool = False) -> Outputs:
        """(logits, L_dev or None, labels) of the next draw (see Defense.forward)."""
        return self.defense(x, Streams.batch(self.next_seed(), x.shape[0]), with_dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x).logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The defense's own prediction in the draw addressed by `seed` (DensePure: the vote)."""
        return self.defense.predict_clean(x, Streams.batch(seed, x.shape[0]))


@torch.no_grad()
def score_defense(model, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int, batch: int) -> dict:
    """Classify each input with `draws` independent draws of the defense (each a full prediction;
    `model` has predict(x, seed), as AttackedModel). single: the single-draw accuracy, the mean
    over all N draws, with its standard error over the per-example means (an example's draws are
    correlated, so the examples are the independent units); majority: of the majority label over
    the draws (ties to the lowest class); any_of_n: DiffHammer's N-evaluation (Wang et al.,
    NeurIPS 2024), an example is broken if ANY of the N draws is wrong, so this is the share right
    in all N draws."""
    if draws < 1:
        raise SdepureError(f"draws must be >= 1, got {draws}")
    preds = torch.empty(x.shape[0], draws, dtype=torch.long)
    for d in range(draws):
        for i in range(0, x.shape[0], batch):
            preds[i:i + batch, d] = model.predict(x[i:i + batch], derive_seed(seed, d, i)).cpu()
    right = preds == y.cpu()[:, None]
    share = right.double().mean(1).tolist()  # per example: the share of draws right
    maj = (majority_vote(preds, model.num_classes) == y.cpu()).tolist()
    every = right.all(1).tolist()
    return {**aggregate_scores(share, maj, every, draws),
            "per_example": {"single": share, "majority": maj, "any_of_n": every}}


def aggregate_scores(share, majority, any_of_n, draws: int) -> dict:
    """score_defense's figures from per-example values (the share of draws right, majority right,
    right in all N): the single-draw accuracy with its standard error over the examples, the
    majority and any-of-N accuracies. Also what an attack run's summary is computed from."""
    n = len(share)
    se = float(np.std(share, ddof=1) / np.sqrt(n)) if n > 1 else None  # JSON null, not NaN
    return {"single": float(np.mean(share)), "single_se": se, "majority": float(np.mean(majority)),
            "any_of_n": float(np.mean(any_of_n)), "draws": draws}


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    flat = delta.reshape(delta.shape[0], -1)
    factor = (eps / flat.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return (flat * factor[:, None]).reshape(delta.shape)


def pgd_eot(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf",
            steps: int = 200, step_size: float = 0.007, eot: int = 20, seed: int = 0,
            random_start: bool = True, progress: Callable[[int], None] | None = None,
            eot_batch: int = 1) -> torch.Tensor:
    """PGD on the cross-entropy with the gradient averaged over `eot` draws of a randomized model
    (expectation over transformation). `eot_batch` draws run as one batch of rows (eot_gradient).
    Returns adversarial examples in [0, 1] within the eps-ball."""
    if norm not in NORMS:
        raise SdepureError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    if eps < 0 or steps < 1 or eot < 1 or step_size <= 0 or eot_batch < 1:
        raise SdepureError("need eps >= 0, steps >= 1, eot >= 1, eot batch >= 1 and step size > 0")
    x = x.detach()
    if random_start:
        u = torch.rand(x.shape, generator=generator(seed), dtype=x.dtype).to(x.device)
        delta = _project((2 * u - 1) * eps, eps, norm)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    ce = lambda logits, y: nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    for _ in range(steps):
        grad = eot_gradient(lambda rows: ce(model(rows), y.repeat(rows.shape[0] // len(y))), x + delta,
                            eot, eot_batch, wrt=delta)[1]
        with torch.no_grad():
            if norm == "Linf":
                step = step_size * grad.sign()
            else:
                g = grad.reshape(grad.shape[0], -1)
                step = step_size * (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)
            new = _project(delta + step, eps, norm)
            new = (x + new).clamp(0, 1) - x
        delta = new.requires_grad_(True)
        if progress:
            progress(1)
    return (x + delta).detach()


def eot_gradient(loss_rows: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, draws: int, batch: int,
                 wrt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expectation over transformation in batches of rows: draws d = 0..draws-1 of every example
    run as rows d * B + b, `batch` draws per forward pass; loss_rows maps such rows to one loss per
    row (each row its own fresh randomness). Returns the per-example mean loss over the draws
    (detached) and the gradient of the summed per-example means with respect to `wrt`
    (default x; x must then require no grad itself)."""
    if wrt is None:
        wrt = x = x.detach().requires_grad_(True)
    n = x.shape[0]
    total = torch.zeros(n, dtype=x.dtype, device=x.device)
    grad = torch.zeros_like(wrt)
    for d0 in range(0, draws, batch):
        k = min(batch, draws - d0)
        rows = x.repeat(k, *([1] * (x.dim() - 1)))
        loss = loss_rows(rows)
        grad += torch.autograd.grad(loss.sum(), wrt)[0]
        total += loss.detach().reshape(k, n).sum(0)
    return total / draws, grad / draws


# pyautoattack's attacks per version, in the order it runs them (checked at every run)
AUTOATTACK_ORDER = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"], "rand": ["apgd-ce", "apgd-dlr"]}


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, version: str,
               seed: int, batch: int, device, n_iter: int | None = None,
               eot_iter: int | None = None) -> tuple[torch.Tensor, dict]:
    """The official AutoAttack (PyPI pyautoattack), run attack by attack on the examples still
    robust, so each broken example is attributed to the attack that broke it. n_iter, eot_iter:
    APGD's iterations and EOT draws (None: the version's own, 100 and 20 for rand)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise SdepureError("AutoAttack needs the pyautoattack package: pip install pyautoattack") from None
    aa = AutoAttack(model, device=device, eps=eps, norm=norm, seed=seed, version=version)
    aa.verbose = False
    for apgd in (aa.apgd, aa.apgd_targeted):
        if n_iter is not None:
            apgd.n_iter = n_iter
        if eot_iter is not None:
            apgd.eot_iter = eot_iter
    order = list(aa.attacks_to_run)
    if order != AUTOATTACK_ORDER.get(version):
        raise SdepureError(f"pyautoattack runs {order} for version {version}; sdepure expects "
                           f"{AUTOATTACK_ORDER.get(version)}: update AUTOATTACK_ORDER")
    with torch.no_grad():
        clean = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]) == y
    robust = clean.clone()
    x_adv = x.clone()
    broken_by: list[str | None] = [None] * len(x)
    per_attack = {"clean": float(clean.double().mean())}
    for attack in order:
        idx = robust.nonzero().flatten()
        if len(idx):
            aa.attacks_to_run = [attack]
            xa, ya = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch)
            fooled = (ya.to(y.device) != y[idx])
            for j in idx[fooled].tolist():
                broken_by[j] = attack
            x_adv[idx[fooled]] = xa[fooled.to(xa.device)].to(x_adv.device)
            robust[idx[fooled]] = False
        per_attack[attack] = float(robust.double().mean())
    return x_adv, {"attacks": order, "clean_flags": clean.tolist(), "robust_flags": robust.tolist(),
                   "broken_by": broken_by, "accuracy_after": per_attack}


def input_gradient(model: AttackedModel, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """d CE(model(x), y) / dx for one draw addressed by `seed` (same noise, same Brownian path)."""
    model.reset(seed)
    xg = x.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xg), y, reduction="sum")
    return torch.autograd.grad(loss, xg)[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
