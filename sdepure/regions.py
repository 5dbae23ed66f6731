"""Robust regions of a smoothed classifier g, seen two ways.

Slices: the plane through an input x spanned by a chosen direction u (e.g. toward the nearest
adversarial example) and a random direction v orthogonal to it, a grid on that plane, and g's
PREDICT on every grid point, batched over grid points and noise draws (Smooth.predict_many: one
defense call for many points).

The nearest change: an upper bound on how far g's prediction holds, to set beside CERTIFY's lower
bound. An attack on the Monte Carlo soft classifier G(x) = E softmax(F(x + sigma z)) (Salman et
al. 2019), by decoupled direction and norm (DDN, Rony et al. 2019), gives candidate directions; a
search along each with PREDICT finds where g returns another class (an abstention is no change),
and one fresh, independently seeded PREDICT confirms the nearest point found: the many PREDICTs of
the searches can each err, the confirmation is one test at a point fixed before its draws. So a
certified radius above a confirmed distance needs CERTIFY (alpha_C) or the confirmation (alpha_P)
to have failed: across inputs at most Binomial(inputs, alpha_C + alpha_P) of them
(against_diagonal). Points are not clipped to the image range: the certificate holds in all of R^d.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.stats import binom

from .brownian import Streams
from .errors import SdepureError
from .rng import Search, derive_seed, generator
from .smoothing import ABSTAIN, Smooth

Logits = Callable[[torch.Tensor, Streams], torch.Tensor]  # (noisy batch, rows' address) -> differentiable logits


def slice_plane(x: torch.Tensor, direction: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v): u the unit vector along `direction`, v a unit vector orthogonal to u drawn from
    `seed` (a Gaussian direction with its u component removed); both shaped like x."""
    if direction.shape != x.shape:
        raise SdepureError(f"the slice direction has shape {tuple(direction.shape)}, the image {tuple(x.shape)}")
    length = float(direction.norm())
    if not length > 0:
        raise SdepureError("the slice direction has zero length")
    u = direction / length
    g = torch.randn(x.shape, generator=generator(seed), dtype=x.dtype).to(x.device)
    v = g - (g * u).sum() * u
    return u, v / v.norm()


def grid(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, extent: float, size: int):
    """(points (size * size, *x.shape), offsets (size,)): x + a u + b v for a, b on size evenly
    spaced offsets in [-extent, extent], row-major (b the row, a the column)."""
    if size < 2:
        raise SdepureError(f"a grid needs at least 2 points per side, got {size}")
    if not extent > 0:
        raise SdepureError(f"the grid's extent must be > 0, got {extent}")
    if u.shape != x.shape or v.shape != x.shape:
        raise SdepureError(f"slice directions of shape {tuple(u.shape)} and {tuple(v.shape)} for an image of "
                           f"shape {tuple(x.shape)}")
    t = torch.linspace(-extent, extent, size, dtype=x.dtype, device=x.device)
    b, a = torch.meshgrid(t, t, indexing="ij")
    shape = (-1, *([1] * x.dim()))
    points = x.unsqueeze(0) + a.reshape(shape) * u.unsqueeze(0) + b.reshape(shape) * v.unsqueeze(0)
    return points, t


def decision_map(smooth: Smooth, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, extent: float, size: int,
                 n: int, alpha: float, batch: int, seed: int, rows: int | None = None) -> torch.Tensor:
    """(size, size) PREDICT labels (ABSTAIN = -1) of the smoothed classifier on grid(...); grid
    point i draws under derive_seed(seed, i), so a point's label does not depend on the grid's
    other points or on how they are batched."""
    points, _ = grid(x, u, v, extent, size)
    labels = smooth.predict_many(points, n, alpha, batch, [derive_seed(seed, i) for i in range(len(points))], rows)
    return torch.tensor(labels).reshape(size, size)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def soft_smoothed(logits_of: Logits, smooth: Smooth, xs: torch.Tensor, m: int, seeds) -> torch.Tensor:
    """(inputs, classes) the Monte Carlo soft smoothed classifier: the mean over m draws z of
    softmax(logits_of(x + sigma z)), the copies made as smooth makes PREDICT's
    (Smooth.noisy_copies): input p's under derive_seed(seeds[p], NOISE / BASE)."""
    noisy, address = smooth.noisy_copies(xs, m, lambda p, tag: derive_seed(seeds[p], tag))
    return logits_of(noisy, address).softmax(-1).reshape(len(seeds), m, -1).mean(1)


def attack_soft(logits_of: Logits, smooth: Smooth, xs: torch.Tensor, labels: torch.Tensor, seeds,
                toward: bool = False, steps: int = 40, m: int = 16, step: float = 0.5, init_norm: float = 1.0,
                gamma: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """DDN on the soft smoothed classifier: each step ascends the log-probability of labels[p]
    (toward) or its negative along the normalised gradient, then rescales the perturbation to a norm
    eps that shrinks by (1 - gamma) where the soft classifier's top class has already left labels[p]
    (toward: become labels[p]) and grows by (1 + gamma) where not; fresh noise every step.
    Returns (perturbations, norms): the smallest perturbation at which that happened, norm inf
    and the last perturbation where it never did."""
    if xs.dim() < 2 or labels.shape != (xs.shape[0],) or len(seeds) != xs.shape[0]:
        raise SdepureError(f"the attack takes a batch of inputs with one label and one seed each; got inputs "
                           f"{tuple(xs.shape)}, labels {tuple(labels.shape)}, {len(seeds)} seeds")
    labels = labels.to(xs.device)
    delta = torch.zeros_like(xs, requires_grad=True)
    eps = torch.full((xs.shape[0],), float(init_norm), dtype=xs.dtype, device=xs.device)
    best = torch.full_like(eps, math.inf)
    best_delta = torch.zeros_like(xs)
    for k in range(steps):
        with torch.enable_grad():
            probs = soft_smoothed(logits_of, smooth, xs + delta, m, [derive_seed(s, Search.SOFT, k) for s in seeds])
            logp = probs.clamp_min(1e-30).log().gather(1, labels[:, None])[:, 0]
            (grad,) = torch.autograd.grad((logp if toward else -logp).sum(), delta)
        with torch.no_grad():
            top = probs.argmax(1)
            done = top == labels if toward else top != labels
            norms = _flat(delta).norm(dim=1)
            better = done & (norms > 0) & (norms < best)  # the unperturbed input is no attack
            best = torch.where(better, norms, best)
            best_delta[better] = delta[better]
            eps = torch.where(done, eps * (1 - gamma), eps * (1 + gamma))
            g = _flat(grad)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            d = _flat(delta) + step * 0.5 * (1 + math.cos(math.pi * k / steps)) * g  # DDN's cosine schedule
            d = d * (eps / d.norm(dim=1).clamp_min(1e-12))[:, None]
        delta = d.reshape(xs.shape).requires_grad_(True)
    never = torch.isinf(best)
    best_delta[never] = delta.detach()[never]
    return best_delta, best


def _changed(smooth: Smooth, xs, labels, directions, ps, ts, n, alpha, batch, seeds, rows):
    """[(PREDICT at xs[p] + t u_p returns a class but labels[p], that PREDICT)] for p, t in ps, ts
    (labels[p] = ABSTAIN: any class), in one predict_many; the k-th point draws under seeds[k]."""
    points = torch.stack([xs[p] + t * directions[p] for p, t in zip(ps, ts)])
    got = smooth.predict_many(points, n, alpha, batch, seeds, rows)
    return [(g != labels[p] and g != ABSTAIN, int(g)) for p, g in zip(ps, got)]


def search_along(smooth: Smooth, xs: torch.Tensor, labels, directions: torch.Tensor, start, max_radius: float,
                 n: int, alpha: float, batch: int, seeds, rounds: int = 8, grow: float = 1.5,
                 rows: int | None = None) -> list[dict]:
    """For each input x_p, unit direction u_p: the distance t along u_p at which PREDICT (n draws,
    level alpha) returns a class other than labels[p] (an abstention is no change). From start[p]
    the distance grows by `grow` up to max_radius until PREDICT changes (status "found", else
    "none found"), then `rounds` bisection steps. Every step is one predict_many over all inputs
    still searching; input p's k-th PREDICT draws under derive_seed(seeds[p], SEARCH, k), so no
    result depends on the other inputs. Rows: distance (the final point's t, where PREDICT last
    changed), lower (the largest t seen without a change), status, predicts (PREDICT calls). The
    final point is not yet confirmed (confirm)."""
    if not max_radius > 0:
        raise SdepureError(f"the search radius must be > 0, got {max_radius}")
    count = xs.shape[0]
    labels = [int(c) for c in labels]
    if directions.shape != xs.shape or len(labels) != count or len(seeds) != count or len(start) != count:
        raise SdepureError(f"the search takes one direction, label, seed and start per input; got inputs "
                           f"{tuple(xs.shape)}, directions {tuple(directions.shape)}, {len(labels)} labels, "
                           f"{len(seeds)} seeds, {len(start)} starts")
    lo = [0.0] * count
    hi = [min(float(t), max_radius) if math.isfinite(float(t)) and float(t) > 0 else max_radius for t in start]
    calls = [0] * count

    def changed(ps, ts):
        out = _changed(smooth, xs, labels, directions, ps, ts, n, alpha, batch,
                       [derive_seed(seeds[p], Search.SEARCH, calls[p]) for p in ps], rows)
        for p in ps:
            calls[p] += 1
        return out

    todo, found = list(range(count)), []
    while todo:  # bracket: grow until PREDICT changes or the search radius is reached
        later = []
        for p, (c, _) in zip(todo, changed(todo, [hi[p] for p in todo])):
            if c:
                found.append(p)
            elif hi[p] < max_radius:
                lo[p], hi[p] = hi[p], min(hi[p] * grow, max_radius)
                later.append(p)
            else:
                lo[p] = hi[p]
        todo = later
    for _ in range(rounds if found else 0):
        mids = [(lo[p] + hi[p]) / 2 for p in found]
        for p, t, (c, _) in zip(found, mids, changed(found, mids)):
            lo[p], hi[p] = (lo[p], t) if c else (t, hi[p])
    return [{"distance": hi[p] if p in found else None, "lower": lo[p],
             "status": "found" if p in found else "none found", "predicts": calls[p]} for p in range(count)]


def confirm(smooth: Smooth, xs: torch.Tensor, labels, directions: torch.Tensor, found: list[dict], n: int,
            alpha: float, batch: int, seeds, rows: int | None = None) -> list[dict]:
    """One fresh PREDICT (level alpha, draws derive_seed(seeds[p], CONFIRM)) at each found point
    xs[p] + distance u_p: status "confirmed" if it returns a class other than labels[p] (then
    distance is an upper bound on how far g's prediction holds, unless this PREDICT erred,
    probability <= alpha), else "not confirmed"; label: what it returned. Rows of "none found"
    pass unchanged."""
    labels = [int(c) for c in labels]
    ps = [p for p, f in enumerate(found) if f["status"] == "found"]
    out = [{**f, "label": ABSTAIN} for f in found]
    if ps:
        got = _changed(smooth, xs, labels, directions, ps, [found[p]["distance"] for p in ps], n, alpha, batch,
                       [derive_seed(seeds[p], Search.CONFIRM) for p in ps], rows)
        for p, (c, g) in zip(ps, got):
            out[p].update(status="confirmed" if c else "not confirmed", label=g)
    return out


def runner_up(logits_of: Logits, smooth: Smooth, xs: torch.Tensor, labels, m: int, seeds) -> list[int]:
    """The soft smoothed classifier's most likely class at each input other than labels[p] (m
    draws addressed by derive_seed(seeds[p], RUNNER_UP))."""
    with torch.no_grad():
        probs = soft_smoothed(logits_of, smooth, xs, m, [derive_seed(s, Search.RUNNER_UP) for s in seeds])
    probs[torch.arange(len(xs)), torch.as_tensor([int(c) for c in labels])] = -1.0
    return probs.argmax(1).tolist()


def nearest_change(smooth: Smooth, logits_of: Logits, xs: torch.Tensor, labels, seeds, max_radius: float,
                   n: int, alpha: float, batch: int, targets=None, steps: int = 40, m: int = 16,
                   rounds: int = 8, rows: int | None = None, search_alpha: float | None = None,
                   **ddn) -> tuple[torch.Tensor, list[dict]]:
    """(unit directions, rows) for inputs xs whose smoothed prediction is labels[p]: the closest
    change of PREDICT to a class other than labels[p] that the attack found, confirmed once.
    Candidate directions, each from attack_soft on `logits_of` (e.g. Defense.logits) with
    smooth's sigma and draws: away from labels[p], and toward the soft classifier's runner-up
    (moving away alone often ends where no class leads and PREDICT abstains); or, given
    `targets`, only toward targets[p] (a misclassified image's true class; labels[p] may then be
    ABSTAIN, and any class is a change). Each candidate is
    searched (search_along, starting at the attack's norm) at the stricter level search_alpha
    (default alpha / 1000), so the search ends where PREDICT at alpha mostly changes; the nearest
    change over the candidates gets the one confirming PREDICT at alpha (confirm). One
    confirmation per input keeps its error at alpha whatever the number of candidates.
    Candidate c's randomness descends from derive_seed(seeds[p], CANDIDATE, c), the
    confirmation's from seeds[p]. Rows as confirm's, with candidate (its name) and soft_norm (the attack's norm, inf
    where the soft classifier never changed)."""
    search_alpha = alpha / 1000 if search_alpha is None else search_alpha
    labels = [int(c) for c in labels]
    if len(labels) != xs.shape[0] or len(seeds) != xs.shape[0] or (targets is not None and len(targets) != len(labels)):
        raise SdepureError(f"the search takes one label, seed (and target) per input; got {xs.shape[0]} inputs, "
                           f"{len(labels)} labels, {len(seeds)} seeds"
                           + (f", {len(targets)} targets" if targets is not None else ""))
    if targets is None and ABSTAIN in labels:
        raise SdepureError("an input whose smoothed classifier abstains has no class to move away from; give "
                           "targets (e.g. its true class)")
    if targets is not None:
        goals = {"toward target": ([int(c) for c in targets], True)}
    else:
        second = runner_up(logits_of, smooth, xs, labels, max(m, 32), seeds)
        goals = {"away": (labels, False), "toward runner-up": (second, True)}
    best_dirs, best = None, None
    for c, (name, (goal, toward)) in enumerate(goals.items()):
        sub = [derive_seed(s, Search.CANDIDATE, c) for s in seeds]
        deltas, norms = attack_soft(logits_of, smooth, xs, torch.as_tensor(goal), sub, toward, steps, m, **ddn)
        for p in (_flat(deltas).norm(dim=1) == 0).nonzero().flatten().tolist():  # no gradient: a random direction
            deltas[p] = torch.randn(xs.shape[1:], generator=generator(sub[p]), dtype=xs.dtype).to(xs.device)
        dirs = deltas / _flat(deltas).norm(dim=1).reshape(-1, *([1] * (xs.dim() - 1)))
        found = search_along(smooth, xs, labels, dirs, norms.tolist(), max_radius, n, search_alpha, batch, sub,
                             rounds, rows=rows)
        for f, norm in zip(found, norms.tolist()):
            f.update(candidate=name, soft_norm=norm)
        if best is None:
            best_dirs, best = dirs.clone(), found
            continue
        for p, f in enumerate(found):
            old = best[p]
            if f["distance"] is not None and (old["distance"] is None or f["distance"] < old["distance"]):
                best[p], best_dirs[p] = f, dirs[p]
    return best_dirs, confirm(smooth, xs, labels, best_dirs, best, n, alpha, batch, seeds, rows)


def against_diagonal(radii, rows: list[dict], alpha_certify: float, alpha_predict: float, level: float = 1e-6) -> dict:
    """Certified radii (0: abstained) against the searches' rows, one each. Checked: certified and
    confirmed. above: checked inputs whose radius exceeds the confirmed distance, each needing
    CERTIFY or the confirmation to have failed; allowed: the count Binomial(certified,
    alpha_certify + alpha_predict) exceeds with probability at most `level`. median_ratio: of radius to distance
    over the checked inputs (1: the certificate is tight; it is how loose it is)."""
    if len(radii) != len(rows):
        raise SdepureError(f"{len(radii)} radii for {len(rows)} searches")
    radii = np.asarray(radii, dtype=float)
    certified = radii > 0
    confirmed = np.array([r["status"] == "confirmed" for r in rows], dtype=bool)
    checked = certified & confirmed
    distance = np.array([r["distance"] if r["distance"] is not None else np.nan for r in rows], dtype=float)
    above = checked & (radii > distance)
    # each certified input fails (CERTIFY or its confirmation wrong) with probability <= alpha_C + alpha_P;
    # counting over the confirmed ones only would select on the confirmations' own outcomes
    allowed = int(binom.isf(level, int(certified.sum()), alpha_certify + alpha_predict)) if certified.any() else 0
    ratio = radii[checked] / distance[checked]
    return {"inputs": len(rows), "certified": int(certified.sum()), "checked": int(checked.sum()),
            "above": int(above.sum()), "allowed": allowed, "level": level,
            "none_found": int((certified & np.array([r["status"] == "none found" for r in rows])).sum()),
            "not_confirmed": int((certified & np.array([r["status"] == "not confirmed" for r in rows])).sum()),
            "median_ratio": float(np.median(ratio)) if len(ratio) else None}


def choose_images(rows: list[dict]) -> dict[str, dict]:
    """Images to slice, by rule, from a certify run's rows: the correct one with the largest
    certified radius, the correct one with the smallest nonzero radius, and the first
    misclassified one (a class other than its label), or the first abstention if none is."""
    correct = [r for r in rows if r["correct"] and r["radius"] > 0]
    wrong = [r for r in rows if r["predict"] not in (r["label"], ABSTAIN)]
    if not correct:
        raise SdepureError("no image of the run is certified correct; nothing to slice")
    chosen = {"large radius": max(correct, key=lambda r: r["radius"])}
    if len(correct) > 1:
        chosen["small radius"] = min(correct, key=lambda r: r["radius"])
    if wrong:
        chosen["misclassified"] = wrong[0]
    else:
        abstained = [r for r in rows if r["predict"] == ABSTAIN]
        if abstained:
            chosen["abstained"] = abstained[0]
    return chosen
