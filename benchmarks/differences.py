"""Where sdepure deliberately differs from the authors' code, and by how much (measured).

Each entry puts sdepure's own functions (schedules, solvers, the defense, image preprocessing) on
one side and, on the other, a short expression of what the authors' code computes, written here
from facts checked in their repositories (file and function named in each entry's
`authors_code`; nothing is imported from them):

  NVlabs/DiffPure                           @ 985703facc13da38d84bcaf52b3bc5b2ef9906f1
  Jayfeather1024/DensePure                  @ 1ed105d13a6ccfaf34a4fc240609dae89abc6a0d
  ethz-spylab/diffusion_denoised_smoothing  @ 699e7a59d30e957c8b9cf75ee4dc4597358bfa10

Sizes that need a network use the digits eps-network shipped with sdepure (a trained model;
nothing can be downloaded) or a random smooth image; a few differences cannot be sized
without the real checkpoints and say so. Prints one JSON object on stdout ("differences": one
entry per remaining difference, with what, authors_code, sdepure, size, unit, how, the figures
behind the size in "detail" and a short "cell" for the README; "fixed": the differences sdepure
has since removed, one line each with the size they had before) and writes the README table as
markdown (--md). About 20 s on one thread.

    python benchmarks/differences.py [--md benchmarks/differences.md] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchsde

from sdepure import solvers
from sdepure.brownian import GridBrownian
from sdepure.classifiers.external import PAPER_INPUTS, InputAdapter
from sdepure.config import load_config
from sdepure.data import load_digits
from sdepure.defense import Defense, majority_vote, t_star_for
from sdepure.imagedata import IMAGENET_PREPROCESSING, preprocess_image
from sdepure.models import build_score_model
from sdepure.models.adm import adm_eps_model
from sdepure.models.base import DiffusionModel, EpsNetModel
from sdepure.rng import derive_seed, randn
from sdepure.schedules import DiscreteVP, LinearVP, alpha_bar_for_sigma
from sdepure.sde import time_grid
from sdepure.settings import Purifier

DIFFPURE = "NVlabs/DiffPure"
DENSEPURE = "Jayfeather1024/DensePure"
CARLINI = "ethz-spylab/diffusion_denoised_smoothing"
SIGMAS = (0.25, 0.5, 1.0)
B = 10  # DensePure's published number of reverse steps
COS_S = 0.008  # improved-diffusion's cosine offset


def sig(x: float, digits: int = 2) -> str:
    """x with `digits` significant figures, in plain or e-notation."""
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.{digits - 1}e}".replace("e-0", "e-")


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def span(lo: float, hi: float, fmt=sig) -> str:
    """'lo to hi', or one value when both print the same."""
    a, b = fmt(lo), fmt(hi)
    return a if a == b else f"{a} to {b}"


# ---------------------------------------------------------------------------------------------
# DensePure
# ---------------------------------------------------------------------------------------------

def cos_f(u: float) -> float:
    """improved-diffusion's cosine alpha_bar before normalisation (f(0) != 1)."""
    return math.cos((u + COS_S) / (1 + COS_S) * math.pi / 2) ** 2


def densepure_chain(table: str, sigma: float) -> dict:
    """What DensePure's code computes for one sigma (b = 10), from the facts:
    - input scale sqrt(1 / (1 + 4 sigma^2)) (both runners' __init__, self.scale);
    - t*: ImageNet, the table index whose noise ratio sqrt(1/ab - 1) is nearest 2 sigma
      (GuidedDiffusion.__init__); CIFAR-10, the real-valued T * tau with f(tau)/f(0) = 1/(1+4 sigma^2),
      the continuous cosine inverted exactly (Diffusion.__init__, self.t);
    - model indices round(t* - i t*/b), i < b (image_editing_sample, use_t_steps);
    - the chain's alpha_bar at model index idx (p_sample, indices_t_steps branch; the chain runs
      over [0, idx_{b-1}, ..., idx_0]): ImageNet table[idx] / table[0]; CIFAR-10 f(idx/T) / f(0);
    - the step's noise std exp(0.5 (v' log beta + (1 - v') log beta~)), v' = (v + 1)/2 from the
      model's variance channels, beta and beta~ = beta (1 - ab_prev) / (1 - ab) on the chain (the
      clipped log beta~ of the step that ends at t = 0 does not matter: that step adds no noise)."""
    if table == "imagenet":
        ab_table = DiscreteVP.linear(1000).alpha_bars.numpy()
        ratio = np.sqrt(1.0 / ab_table - 1.0)
        target = 2 * sigma
        t = len(ab_table) - 1
        for i in range(len(ab_table) - 1):  # the bracketing pair, the nearer one (ties: lower)
            if ratio[i] < target <= ratio[i + 1]:
                t = i + 1 if target - ratio[i] > ratio[i + 1] - target else i
                break
        idx = [round(t - i * t / B) for i in range(B)]
        ab = [ab_table[i] / ab_table[0] for i in idx]
    else:
        T = 4000
        # tau with f(tau) = f(0) / (1 + 4 sigma^2): cos((tau+s)/(1+s) pi/2) = sqrt(f(0)/(1+4 sigma^2))
        c = math.sqrt(cos_f(0.0) / (1 + 4 * sigma ** 2))
        t = T * ((1 + COS_S) * 2 / math.pi * math.acos(c) - COS_S)
        idx = [round(t - i * t / B) for i in range(B)]
        ab = [cos_f(i / T) / cos_f(0.0) for i in idx]
    # the chain in sampling order: ab[0] (largest t) ... ab[-1], then alpha_bar = 1 at t = 0
    prev = ab[1:] + [1.0]
    beta = [1 - a / p for a, p in zip(ab, prev)]
    beta_tilde = [b * (1 - p) / (1 - a) for b, a, p in zip(beta, ab, prev)]
    return {"t_star": t, "idx": idx, "ab": ab, "scale": math.sqrt(alpha_bar_for_sigma(sigma)),
            "beta": beta, "beta_tilde": beta_tilde}


def sdepure_chain(schedule: DiscreteVP, sigma: float) -> dict:
    """sdepure's densepure defense on the same table: t* by defense.t_star_for (checked equal to the
    Defense's own), the input scale sqrt(Defense.alpha_bar) that Defense.x_t_star applies, the
    subsequence and its alpha_bar as solvers.ddpm_ancestral reads them (solvers._subsequence), and
    the table indices the network is fed."""
    model = DiffusionModel(schedule)
    t_star = t_star_for(schedule, sigma, "densepure")
    defense = Defense(Purifier("densepure", sigma=sigma, steps=B, solver="ddpm"), model, torch.nn.Identity(), 10)
    assert defense.t_star == t_star
    x = torch.full((1, 1), 0.75, dtype=torch.float64)  # x_t* = scale (2 x - 1) = scale / 2
    scale = 2 * float(defense.x_t_star(x))
    times, ab = solvers._subsequence(model, t_star, B)
    idx = [round(float(schedule.index_of_time(torch.tensor(t, dtype=torch.float64)))) for t in times[:-1]]
    return {"t_star_index": round(float(schedule.index_of_time(torch.tensor(t_star, dtype=torch.float64)))),
            "idx": idx, "ab": ab[:-1], "scale": scale}


def noise_level(ab: float) -> float:
    """sqrt(1/alpha_bar - 1): the noise-to-signal ratio, 2 sigma on the model's scale."""
    return math.sqrt(1.0 / ab - 1.0)


def densepure_entries() -> tuple[list[dict], dict]:
    """The DensePure rows, and the fixed learned-variance difference (its size before the fix)."""
    tables = {"imagenet": DiscreteVP.linear(1000), "cifar10": DiscreteVP.cosine(4000)}
    scale_rows, chain_rows, offby1_rows, var_rows = [], [], [], []
    for name, schedule in tables.items():
        for s in SIGMAS:
            dp, sd = densepure_chain(name, s), sdepure_chain(schedule, s)
            scale_rel = dp["scale"] / sd["scale"] - 1
            # DensePure's own mismatch: the chain takes its input to be at alpha_bar ab[0]
            dp_internal = dp["scale"] / math.sqrt(dp["ab"][0]) - 1
            ab_rel = [a / b - 1 for a, b in zip(dp["ab"], sd["ab"])]
            level_rel = [noise_level(a) / noise_level(b) - 1 for a, b in zip(dp["ab"], sd["ab"])]
            scale_rows.append({"table": name, "sigma": s, "densepure_scale": dp["scale"],
                               "sdepure_scale": sd["scale"], "relative_difference": scale_rel,
                               "densepure_scale_vs_its_own_chain_start": dp_internal})
            chain_rows.append({"table": name, "sigma": s, "densepure_indices": dp["idx"],
                               "sdepure_indices": sd["idx"],
                               "index_difference": [a - b for a, b in zip(dp["idx"], sd["idx"])],
                               "alpha_bar_relative_difference": ab_rel, "noise_level_relative_difference": level_rel})
            if name == "cifar10":
                trained = schedule.alpha_bars.numpy()
                # alpha_bar DensePure reads at model index idx, against the table idx was trained at
                rel = [a / trained[i] - 1 for a, i in zip(dp["ab"], dp["idx"])]
                level = [noise_level(a) / noise_level(trained[i]) - 1 for a, i in zip(dp["ab"], dp["idx"])]
                offby1_rows.append({"sigma": s, "densepure_t_star": dp["t_star"],
                                    "sdepure_t_star_index": sd["t_star_index"],
                                    "alpha_bar_relative_difference": rel, "noise_level_relative_difference": level})
            # noisy steps are all but the last one (no noise at t = 0)
            ratio = [math.sqrt(b / bt) for b, bt in zip(dp["beta"][:-1], dp["beta_tilde"][:-1])]
            var_rows.append({"table": name, "sigma": s, "min": min(ratio), "max": max(ratio)})

    imagenet = [c for c in chain_rows if c["table"] == "imagenet"]
    imagenet_ab = [r for c in imagenet for r in c["alpha_bar_relative_difference"]]
    imagenet_level = [abs(r) for c in imagenet for r in c["noise_level_relative_difference"]]
    scale_abs = [abs(r["relative_difference"]) for r in scale_rows]
    offby1 = [abs(v) for r in offby1_rows for v in r["alpha_bar_relative_difference"]]
    offby1_level = [abs(v) for r in offby1_rows for v in r["noise_level_relative_difference"]]
    cifar_shift = [c for c in chain_rows if c["table"] == "cifar10"]
    cifar_ab = [abs(v) for c in cifar_shift for v in c["alpha_bar_relative_difference"]]
    var_lo, var_hi = min(r["min"] for r in var_rows), max(r["max"] for r in var_rows)
    return [
        {
            "id": "densepure-input-scale",
            "what": "DensePure scales the noisy input by sqrt(1/(1+4 sigma^2)), the continuous target, "
                    "not by sqrt(alpha_bar(t*)) of the step its chain starts from",
            "authors_code": f"{DENSEPURE}: runners/diffpure_guided_densepure.py GuidedDiffusion.__init__ and "
                            "runners/diffpure_ddpm_densepure.py Diffusion.__init__ (self.scale), applied in "
                            "image_editing_sample",
            "sdepure": "sqrt(alpha_bar(t*)) of the schedule at its t* (defense.Defense.x_t_star): the input is "
                       "exactly a forward-diffused sample at the chain's first step",
            "size": f"{span(min(scale_abs), max(scale_abs))} relative",
            "unit": "relative difference of the input scale, |DensePure / sdepure - 1|",
            "how": "both tables (ImageNet linear T=1000, CIFAR-10 cosine T=4000) at sigma 0.25, 0.5, 1.0, b=10; "
                   "sdepure's t* from defense.t_star_for (the Defense's own), its scale from Defense.x_t_star",
            "detail": scale_rows,
        },
        {
            "id": "densepure-alpha-bar0",
            "what": "DensePure's ImageNet chain divides the respaced alpha_bar by alpha_bar[0] = 1 - 1e-4 "
                    "(its respacing starts at table index 0 instead of alpha_bar = 1)",
            "authors_code": f"{DENSEPURE}: guided_diffusion/gaussian_diffusion.py GaussianDiffusion.p_sample "
                            "(indices_t_steps branch: betas from alphas_cumprod_origin[t2] / alphas_cumprod_origin[t1] "
                            "over [0, idx_(b-1), ..., idx_0])",
            "sdepure": "the table's alpha_bar at each step (solvers._subsequence), alpha_bar = 1 at t = 0",
            "cell": f"alpha_bar {span(min(imagenet_ab), max(imagenet_ab))} higher, noise level up to "
                    f"{pct(max(imagenet_level), 1)} lower (relative)",
            "size": f"alpha_bar {span(min(imagenet_ab), max(imagenet_ab))} higher at every step, noise level "
                    f"{span(min(imagenet_level), max(imagenet_level))} lower (relative)",
            "unit": "relative difference along the chain, DensePure / sdepure - 1 (alpha_bar higher, noise level "
                    "sqrt(1/alpha_bar - 1) lower; largest at the chain's last step, at sigma 0.25)",
            "how": "ImageNet table at sigma 0.25, 0.5, 1.0, b=10; sdepure's chain from solvers._subsequence "
                   "(same model indices as DensePure's on this table)",
            "detail": [c for c in chain_rows if c["table"] == "imagenet"],
        },
        {
            "id": "densepure-cifar10-index",
            "what": "DensePure's CIFAR-10 chain reads alpha_bar(idx/T) = f(idx/T)/f(0) at model index idx, "
                    "one table index below the alpha_bar idx was trained at (f((idx+1)/T)/f(0)); its t* is the "
                    "real-valued inverse of the cosine, so its chain starts one index above sdepure's at sigma "
                    "0.25, 0.5 and 1.0",
            "authors_code": f"{DENSEPURE}: improved_diffusion/gaussian_diffusion.py GaussianDiffusion.p_sample "
                            "(indices_t_steps branch: t1 = indices_t_steps[i] / T); runners/diffpure_ddpm_densepure.py "
                            "Diffusion.__init__ (self.t)",
            "sdepure": "the table index nearest the target noise ratio (t_rule nearest) and the table's alpha_bar "
                       "at the index the network is fed",
            "cell": f"alpha_bar up to {pct(max(offby1))} higher, noise level up to {pct(max(offby1_level))} lower; "
                    f"index +1 at {sum(d == 1 for c in cifar_shift for d in c['index_difference'])} of "
                    f"{sum(len(c['index_difference']) for c in cifar_shift)} steps",
            "size": f"alpha_bar {span(min(offby1), max(offby1))} higher, noise level "
                    f"{span(min(offby1_level), max(offby1_level))} lower (relative); model index +1 at "
                    f"{sum(d == 1 for c in cifar_shift for d in c['index_difference'])} of "
                    f"{sum(len(c['index_difference']) for c in cifar_shift)} steps",
            "unit": "relative difference between what DensePure uses at a model index and what that index was "
                    "trained at, along the chains (alpha_bar higher, noise level sqrt(1/alpha_bar - 1) lower)",
            "how": "cosine T=4000 table at sigma 0.25, 0.5, 1.0, b=10; step by step against sdepure's own chain, "
                   f"alpha_bar differs by up to {sig(max(cifar_ab))}, and by 0 at the steps where DensePure feeds the "
                   "index above sdepure's: there the two offsets cancel",
            "detail": {"off_by_one": offby1_rows, "against_sdepure": cifar_shift},
        },
    ], {
        "id": "densepure-learned-variance",
        "where": "DensePure, DDPM step noise",
        "line": "DensePure's DDPM steps use the checkpoints' learned variance; sdepure used beta~ only, and now "
                "uses the learned variance for ddpm on models that have one (variance auto; tests/test_variance.py)",
        "size_before": f"DensePure's step noise std up to {var_lo:.2f} to {var_hi:.2f} times sdepure's "
                       "(sqrt(beta / beta~) on DensePure's respaced chains, both tables, sigma 0.25, 0.5, 1.0, b=10)",
    }


def densepure_vote_entry(seed: int = 0, n: int = 2000, k: int = 4, classes: int = 10) -> dict:
    """DensePure's vote is max(labels, key=labels.count): the first label in run order among the
    most frequent (results/merge_results.py gain_results). sdepure's majority_vote: lowest class."""
    gen = torch.Generator().manual_seed(seed)

    def compare(labels: torch.Tensor) -> dict:
        ours = majority_vote(labels, classes)
        theirs, tie = [], []
        for row in labels.tolist():
            counts = [row.count(c) for c in row]
            top = max(counts)
            tie.append(len({c for c, m in zip(row, counts) if m == top}) > 1)
            theirs.append(row[counts.index(top)])  # first run holding a most frequent label
        differ, tie = ours != torch.tensor(theirs), torch.tensor(tie)
        return {"votes": n, "differ": int(differ.sum()), "ties": int(tie.sum()),
                "differ_without_tie": int((differ & ~tie).sum())}

    uniform = compare(torch.randint(0, classes, (n, k), generator=gen))
    # nearer a real vote: each vote has a true class, each run finds it with probability 0.6, else a
    # uniformly drawn other class
    truth = torch.randint(0, classes, (n, 1), generator=gen)
    other = (truth + torch.randint(1, classes, (n, k), generator=gen)) % classes
    skewed = compare(torch.where(torch.rand(n, k, generator=gen) < 0.6, truth, other))
    assert uniform["differ_without_tie"] == skewed["differ_without_tie"] == 0
    return {
        "id": "densepure-vote-ties",
        "what": "vote ties: DensePure takes the tied label seen first in run order, sdepure the lowest class index",
        "authors_code": f"{DENSEPURE}: results/merge_results.py gain_results (max(list(preds), key=list(preds).count))",
        "sdepure": "defense.majority_vote (lowest class; deterministic whatever order the runs finish in)",
        "cell": f"{uniform['differ']} / {skewed['differ']} of {n} votes (uniform labels / runs right w.p. 0.6), "
                "all ties",
        "size": f"{uniform['differ']} of {n} votes (uniform labels), {skewed['differ']} of {n} (runs right w.p. 0.6); "
                "all ties",
        "unit": f"votes of K={k} over {classes} classes whose winner differs (every one a tie)",
        "how": f"torch.Generator seed {seed}: {n} votes of {k} labels drawn uniformly, then {n} with a random true "
               "class per vote that each run returns with probability 0.6, else another class uniformly; "
               "DensePure's rule written out",
        "detail": {"uniform": uniform, "right_w.p._0.6": skewed},
    }


# ---------------------------------------------------------------------------------------------
# Carlini et al.
# ---------------------------------------------------------------------------------------------

def carlini_entry() -> dict:
    """Their certify.py walks t = 1, 2, ... to the first table step whose sqrt(1-ab)/sqrt(ab) >= 2 sigma
    and DRM.denoise noises with that step's sqrt(1 - ab) (q_sample) while CERTIFY uses sigma."""
    rows, grid_max = [], {}
    for name, schedule in (("imagenet", DiscreteVP.linear(1000)), ("cifar10", DiscreteVP.cosine(4000))):
        ab = schedule.alpha_bars.numpy()
        ratio = np.sqrt((1 - ab) / ab)

        def effective(s):
            t = max(int(np.searchsorted(ratio, 2 * s)), 1)  # first t >= 1 with ratio >= 2 sigma
            return t, ratio[t] / 2

        for s in SIGMAS:
            t, eff = effective(s)
            assert t == schedule.t_index_star(s, "first")  # sdepure's 'first' rule picks the same step
            rows.append({"table": name, "sigma": s, "t": t, "effective_sigma": eff, "relative_excess": eff / s - 1})
        grid = np.arange(0.25, 1.0 + 1e-9, 1e-4)
        excess = np.array([effective(s)[1] / s - 1 for s in grid])
        grid_max[name] = {"max": float(excess.max()), "at_sigma": float(grid[excess.argmax()])}
    at = {r["sigma"]: r["relative_excess"] for r in rows if r["table"] == "imagenet"}
    return {
        "id": "carlini-effective-sigma",
        "what": "Carlini et al.'s code adds the table step's noise sqrt(1 - alpha_bar_t) (t: the first step reaching "
                "2 sigma) and certifies with sigma: the noise added is larger than the sigma certified (conservative)",
        "authors_code": f"{CARLINI}: imagenet/certify.py and cifar10/certify.py main (the while loop on "
                        "sqrt_one_minus_alphas_cumprod / sqrt_alphas_cumprod); */DRM.py DiffusionRobustModel.denoise "
                        "(diffusion.q_sample); */core.py Smooth._sample_noise adds no noise of its own",
        "sdepure": "adds exactly sigma (Smooth) and scales by sqrt(alpha_bar(t*)); the network is then told a noise "
                   "level up to the same ratio above the actual one",
        "cell": f"effective sigma up to {pct(grid_max['imagenet']['max'])} (ImageNet) / "
                f"{pct(grid_max['cifar10']['max'])} (CIFAR-10) above the certified sigma",
        "size": f"effective sigma up to {pct(grid_max['imagenet']['max'])} (ImageNet) / "
                f"{pct(grid_max['cifar10']['max'])} (CIFAR-10) above the certified one; ImageNet {pct(at[0.25])} / "
                f"{pct(at[0.5])} / {pct(at[1.0])} at sigma 0.25 / 0.5 / 1.0",
        "unit": "effective sigma / certified sigma - 1",
        "how": "sigma on a 1e-4 grid over [0.25, 1.0], linear T=1000 and cosine T=4000 tables; the step is the one "
               "sdepure's t_rule 'first' picks (checked equal)",
        "detail": {"per_sigma": rows, "grid_max": grid_max},
    }


# ---------------------------------------------------------------------------------------------
# DiffPure
# ---------------------------------------------------------------------------------------------

T_STARS = {"cifar10-linf": 100, "cifar10-l2": 75, "imagenet": 150}  # DiffPure's --t, in 1/1000
CONFIGS = {"cifar10-linf": "diffpure-cifar10-linf", "cifar10-l2": "diffpure-cifar10-l2",  # sdepure's
           "imagenet": "diffpure-imagenet"}


def diffpure_grid(t_int: int) -> torch.Tensor:
    """The reversed times s at which DiffPure's solve evaluates its drift, and its last time: torchsde's own
    stepping on ts = linspace(1 - t/1000, 1 - 1e-5, 2) (float32), default dt 1e-3, method euler
    (runners/diffpure_sde.py RevGuidedDiffusion.image_editing_sample). Recorded from torchsde itself."""
    seen = []

    class Recorder(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, s, y):
            seen.append(s.detach().clone())
            return torch.zeros_like(y)

        def g(self, s, y):
            return torch.zeros_like(y)

    ts = torch.linspace(1 - t_int * 1.0 / 1000, 1 - 1e-5, 2)
    torchsde.sdeint(Recorder(), torch.zeros(1, 1), ts, method="euler", dt=1e-3)
    # the first call is sdeint's shape check at ts[0]; then one per step
    return torch.cat([torch.stack(seen[1:]), ts[-1:]])


def digits_model() -> EpsNetModel:
    return build_score_model(load_config("digits")["model"])


def diffpure_euler(model, x: torch.Tensor, t_nodes: torch.Tensor, z) -> torch.Tensor:
    """Euler-Maruyama as DiffPure steps it, in reversed time s = 1 - t: x += [1/2 beta x + beta score](t) ds
    + sqrt(beta(t) ds) z_k over the nodes t_0 > t_1 > ... (float64 values; z_k the k-th standard normal
    increment). DiffPure's s and ds are float32, and 1 - s and the differences of neighbouring s are exact
    in float32, so float64 copies of its nodes reproduce them."""
    schedule = model.schedule
    for k in range(len(t_nodes) - 1):
        t, ds = float(t_nodes[k]), float(t_nodes[k] - t_nodes[k + 1])
        beta = float(schedule.beta(torch.tensor(t, dtype=torch.float64)))
        score = model.score(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        x = x + ds * beta * (0.5 * x + score) + math.sqrt(ds * beta) * z(k)
    return x


class TimeRecorder(torch.nn.Module):
    """A stand-in network: records the time input it is fed and returns eps = 0 (2C output channels for a
    learned-sigma model)."""

    def __init__(self):
        super().__init__()
        self.fed: list[torch.Tensor] = []
        self.channels = 1  # output channels per input channel

    def forward(self, x, t):
        self.fed.append(t.detach().clone())
        return torch.zeros(x.shape[0], self.channels * x.shape[1], *x.shape[2:], dtype=x.dtype)


def sdepure_diffpure_model(name: str, net: torch.nn.Module) -> DiffusionModel:
    """sdepure's model for a DiffPure config around `net`: for ImageNet the config's [model] table over the
    guided-256 preset (adm_eps_model, as build_score_model calls it), for CIFAR-10 score_sde's continuous
    VP (build_score_model's wrapping of family score-sde)."""
    cfg = load_config(CONFIGS[name])["model"]
    if cfg["family"] == "adm":
        return adm_eps_model(net, cfg["preset"], schedule=cfg.get("schedule"), time_input=cfg.get("time_input"))
    assert cfg["family"] == "score-sde"
    return EpsNetModel(net, LinearVP(0.1, 20.0), time_input="999t")


def fed_time_inputs(name: str, t_star: float, steps: int) -> torch.Tensor:
    """The time input sdepure's config model feeds its network at each Euler step of its solve (recorded)."""
    net = TimeRecorder()
    model = sdepure_diffpure_model(name, net)
    net.channels = 2 if model.has_variance else 1
    with torch.no_grad():
        solvers.solve(model, torch.zeros(1, 3, 2, 2), t_star, solvers.Sampler("euler", steps), 0)
    return torch.cat(net.fed)


def time_input_row(name: str, t_int: int) -> dict:
    """The network's time input at each step of DiffPure's solve (computed from its recorded float32 nodes as
    its code does) and of sdepure's (recorded from solvers.solve on the config's model). ImageNet: which
    steps differ; CIFAR-10 (continuous 999 t): how many, and by how much at most."""
    s = diffpure_grid(t_int)[:-1]
    fed_sd = fed_time_inputs(name, t_int / 1000, t_int)
    assert len(fed_sd) == t_int
    if name == "imagenet":
        fed_dp = ((1 - s).float() * 1000).long().double()  # _scale_timesteps: (t.float() * N).long(), t = 1 - s
    else:
        fed_dp = (999 * (1 - s)).double()  # score_sde's get_score_fn: labels = t * 999 (float32)
    differ = (fed_dp != fed_sd).nonzero().flatten().tolist()
    return {"setting": name, "steps": t_int, "max_abs_difference": (fed_dp - fed_sd).abs().max().item(),
            "differing_steps": differ if name == "imagenet" else len(differ),
            "diffpure_first": fed_dp[:3].tolist(), "sdepure_first": fed_sd[:3].tolist()}


def diffpure_entries(n_images: int = 120) -> tuple[list[dict], dict]:
    """The DiffPure rows, and the fixed ImageNet schedule difference (its size before the fix)."""
    model = digits_model()
    x0, _ = load_digits("test")
    x0 = 2 * x0[:n_images] - 1
    cont = LinearVP(0.1, 20.0)  # DiffPure's RevVPSDE (beta_min 0.1, beta_max 20)
    table = DiscreteVP.linear(1000)
    # DiffPure noises with the discrete linear betas beta_min/N .. beta_max/N (float32, N = 1000)
    a_disc = torch.cumprod(1 - torch.linspace(0.1 / 1000, 20 / 1000, 1000), 0)

    noising, grid_rows, clamp_rows, feed_rows, sched_rows = [], [], [], [], []
    for name, t_int in T_STARS.items():
        t_star = t_int / 1000
        attack = load_config(CONFIGS[name])["attack"]
        assert (attack["t_star"], attack["steps"], attack["solver"]) == (t_star, t_int, "euler"), attack
        a_dp = float(a_disc[t_int - 1])
        a_cont = float(cont.alpha_bar(torch.tensor(t_star, dtype=torch.float64)))
        # sdepure noises to t* with sigma from its model's alpha_bar(t*) (Defense.diffuse)
        sd_model = sdepure_diffpure_model(name, TimeRecorder())
        defense = Defense(Purifier("diffpure", t_star=t_star, steps=t_int, solver="euler"), sd_model,
                          torch.nn.Identity(), 10)
        a_sd = defense.alpha_bar
        noising.append({"setting": name, "t_star": t_star, "diffpure_noise_alpha_bar": a_dp,
                        "diffpure_solve_alpha_bar": a_cont, "sdepure_alpha_bar": a_sd,
                        "noise_vs_solve_relative": a_dp / a_cont - 1,
                        "diffpure_vs_sdepure_noise_relative": a_dp / a_sd - 1,
                        "noise_std_relative": math.sqrt((1 - a_dp) / (1 - a_cont)) - 1})

        s_grid = diffpure_grid(t_int)
        t_dp = (1 - s_grid).double()  # DiffPure's physical times (1 - s is exact in float32)
        t_sd = time_grid(t_star, 0.0, t_int)
        offset = (t_dp[:-1] - t_sd[:-1]).abs().max().item()
        t_end_only = t_sd.clone()
        t_end_only[-1] = 1e-5  # sdepure's grid with DiffPure's end time: the end's share of the difference

        # same noisy input, same increments z_k: sdepure's solve against DiffPure's grid and end time
        seed = derive_seed(13, t_int)
        xt = math.sqrt(a_sd) * x0 + math.sqrt(1 - a_sd) * randn(x0.shape, derive_seed(seed, 0))
        with torch.no_grad():
            ours = solvers.solve(model, xt, t_star, solvers.Sampler("euler", t_int), derive_seed(seed, 1))
            bm = GridBrownian(derive_seed(seed, 1), xt.shape)
            # check: the hand-written step on sdepure's own grid reproduces solvers.solve
            check = diffpure_euler(model, xt, t_sd, bm.increment)
            theirs = diffpure_euler(model, xt, t_dp, bm.increment)
            end_only = diffpure_euler(model, xt, t_end_only, bm.increment)
        check_err = (check - ours).abs().max().item() / 2
        assert check_err < 1e-5, check_err
        d, d_end = (theirs - ours) / 2, (end_only - ours) / 2  # [0, 1] pixel units
        grid_rows.append({"setting": name, "steps": t_int, "max_time_offset": offset,
                          "last_step": float(t_dp[-2] - t_dp[-1]), "end_time": float(t_dp[-1]),
                          "output_rms": d.pow(2).mean().sqrt().item(), "output_max": d.abs().max().item(),
                          "output_rms_model_scale": d.pow(2).mean().sqrt().item() * 2,
                          "end_time_only_rms": d_end.pow(2).mean().sqrt().item(),
                          "check_max_difference": check_err})
        out = (theirs.clamp(-1, 1) - theirs) / 2
        clamp_rows.append({"setting": name, "share_outside": (theirs.abs() > 1).double().mean().item(),
                           "rms_change": out.pow(2).mean().sqrt().item(), "max_change": out.abs().max().item()})

        feed_rows.append(time_input_row(name, t_int))
        if name == "imagenet":
            t_nodes = t_dp[:-1]
            fed_dp = ((1 - s_grid[:-1]).float() * 1000).long()
            # the fix: sdepure's config model now has DiffPure's continuous schedule ...
            assert torch.allclose(sd_model.schedule.alpha_bar(t_nodes), cont.alpha_bar(t_nodes), rtol=1e-12, atol=0)
            assert torch.allclose(sd_model.schedule.beta(t_nodes), cont.beta(t_nodes), rtol=1e-12, atol=0)
            # ... where it had the checkpoint's table and its index 1000 t - 1: the size before the fix
            ab_rel = cont.alpha_bar(t_nodes) / table.alpha_bar(t_sd[:-1]) - 1
            beta_rel = cont.beta(t_nodes) / table.beta(t_sd[:-1]) - 1
            fed_table = torch.round(table.index_of_time(t_sd[:-1])).long()
            sched_rows.append({"alpha_bar_relative_max": ab_rel.abs().max().item(),
                               "beta_relative_min": beta_rel.min().item(), "beta_relative_max": beta_rel.max().item(),
                               "fed_index_plus_one_share": (fed_dp == fed_table + 1).double().mean().item()})

    noise_rel = [abs(r["noise_vs_solve_relative"]) for r in noising]
    ours_rel = [abs(r["diffpure_vs_sdepure_noise_relative"]) for r in noising]
    sched = sched_rows[0]
    feed = {r["setting"]: r for r in feed_rows}
    im = feed["imagenet"]
    im_differ = im["differing_steps"]
    first = lambda r, n: ", ".join(str(int(v)) for v in r[:n])  # noqa: E731
    feed_cifar = max(feed[s]["max_abs_difference"] for s in ("cifar10-linf", "cifar10-l2"))

    def over(rows, key, fmt=sig):
        return span(min(r[key] for r in rows), max(r[key] for r in rows), fmt)
    entries = [
        {
            "id": "diffpure-noising",
            "what": "DiffPure noises x with the discrete table's a[t-1] but solves with the continuous alpha_bar(t*)",
            "authors_code": f"{DIFFPURE}: runners/diffpure_sde.py RevGuidedDiffusion.image_editing_sample "
                            "(a = (1 - betas).cumprod(), a[total_noise_levels - 1]) and RevVPSDE (alphas_cumprod_cont)",
            "sdepure": "noises and solves with the continuous alpha_bar(t*) in all three DiffPure configs "
                       "(defense.Defense.diffuse: x + sigma z, sigma from Defense.alpha_bar)",
            "size": f"alpha_bar {span(min(noise_rel), max(noise_rel))} relative",
            "unit": "relative difference a[t-1] / alpha_bar_continuous(t*) - 1 (sdepure's Defense.alpha_bar against "
                    f"DiffPure's a[t-1]: {span(min(ours_rel), max(ours_rel))})",
            "how": "t* = 0.1, 0.075 (CIFAR-10), 0.15 (ImageNet); betas linspace(1e-4, 0.02, 1000) in float32 "
                   "as DiffPure's; sdepure's alpha_bar from a Defense on each config's model",
            "detail": noising,
        },
        {
            "id": "diffpure-grid-end",
            "what": "DiffPure's solve runs on torchsde's float32 time grid and ends at t = 1e-5 (last step 0.99e-3); "
                    "on ImageNet its float32 t makes floor(1000 t) one lower on the first steps",
            "authors_code": f"{DIFFPURE}: runners/diffpure_sde.py RevGuidedDiffusion.image_editing_sample "
                            "(ts = linspace(1 - t/1000, 1 - 1e-5, 2), sdeint_adjoint(..., method='euler'), "
                            "default dt 1e-3), RevVPSDE._scale_timesteps ((t.float() * N).long())",
            "sdepure": "a float64 grid built once (sde.time_grid), steps of exactly t*/steps, ending at t = 0; "
                       "ImageNet time input floor(1000 t) of that t cast to float32 (models/base.py TIME_INPUTS)",
            "cell": f"output RMS {over(grid_rows, 'output_rms')} in [0, 1] pixels (digits); ImageNet time input "
                    f"{first(im['diffpure_first'], len(im_differ))} against "
                    f"{first(im['sdepure_first'], len(im_differ))} on the first {len(im_differ)} of {im['steps']} steps",
            "size": f"output RMS {over(grid_rows, 'output_rms')} (max {sig(max(r['output_max'] for r in grid_rows))}) "
                    f"in [0, 1] pixels, nearly all from the end time (alone: RMS {over(grid_rows, 'end_time_only_rms')}); "
                    f"nodes within {sig(max(r['max_time_offset'] for r in grid_rows))}; ImageNet feeds "
                    f"{first(im['diffpure_first'], len(im_differ))} on its first {len(im_differ)} steps where sdepure "
                    f"feeds {first(im['sdepure_first'], len(im_differ))} "
                    f"(the other {im['steps'] - len(im_differ)} agree)",
            "unit": "[0, 1] pixel units between the two solves' outputs (twice that on the model's [-1, 1] scale); "
                    "time units for the node offset; the ImageNet network's integer time input",
            "how": f"the digits eps-network, {n_images} test images, same noisy input and increments; a hand-written "
                   "Euler step on DiffPure's grid (recorded from torchsde) against solvers.solve (the same step on "
                   "sdepure's grid reproduces solvers.solve: check_max_difference); the time inputs sdepure feeds "
                   "recorded from solvers.solve on each config's model around a stand-in network (CIFAR-10's 999 t "
                   f"within {sig(feed_cifar)} of DiffPure's), DiffPure's computed from its recorded float32 nodes",
            "detail": {"solves": grid_rows, "time_inputs": feed_rows},
        },
        {
            "id": "diffpure-unclamped",
            "what": "DiffPure passes the solve's output to the classifier unclamped; sdepure clamps it to [-1, 1]",
            "authors_code": f"{DIFFPURE}: eval_sde_adv.py SDE_Adv_Model.forward (classifier((x_re + 1) * 0.5))",
            "sdepure": "defense.Defense.purify ((x0.clamp(-1, 1) + 1) / 2)",
            "cell": f"{over(clamp_rows, 'share_outside', lambda x: pct(x, 0))} of pixels outside, RMS change "
                    f"{over(clamp_rows, 'rms_change')} (digits: an upper end)",
            "size": f"{over(clamp_rows, 'share_outside', lambda x: pct(x, 0))} of pixels outside, RMS change "
                    f"{over(clamp_rows, 'rms_change')} in [0, 1] pixels (digits: an upper end)",
            "unit": "share of output pixels outside [-1, 1]; RMS of the clamp's change in [0, 1] pixel units",
            "how": f"DiffPure-style solves (previous row) of {n_images} digits test images at t* = 0.1, 0.075, 0.15 with "
                   "the digits eps-network (digits are mostly saturated background: an upper end for natural images)",
            "detail": clamp_rows,
        },
    ]
    fixed = {
        "id": "diffpure-imagenet-schedule",
        "where": "DiffPure ImageNet, schedule and time input",
        "line": "DiffPure solves the guided-diffusion model with the continuous linear VP (beta 0.1..20) and feeds "
                "floor(1000 t) of a float32 t; sdepure used the checkpoint's table and index 1000 t - 1, and the "
                "diffpure-imagenet config now uses DiffPure's SDE and time input (tests/test_diffpure_imagenet.py)",
        "size_before": f"alpha_bar up to {sig(sched['alpha_bar_relative_max'])}, beta "
                       f"{pct(sched['beta_relative_min'], 1)} to +{pct(sched['beta_relative_max'], 0)} (relative); "
                       f"model index +1 on {pct(sched['fed_index_plus_one_share'], 1)} of steps "
                       "(t* = 0.15, 150 Euler steps)",
    }
    return entries, fixed


def t_min_entry(n_images: int = 120) -> dict:
    """EpsNetModel clamps t >= t_min (1e-3 for continuous schedules). Run DiffPure's setting (t* = 0.1,
    dt = 1e-3) with t_min 1e-3 and with 1e-5 (DiffPure's end time) on the same noise."""
    base = digits_model()
    alt = EpsNetModel(base.net, base.schedule, base.time_input, t_min=1e-5).eval()
    x0, _ = load_digits("test")
    x0 = 2 * x0[:n_images] - 1
    a = float(base.schedule.alpha_bar(torch.tensor(0.1, dtype=torch.float64)))
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * randn(x0.shape, 7)
    rows = []
    with torch.no_grad():
        for method in ("euler", "midpoint", "heun"):
            y1 = solvers.solve(base, xt, 0.1, solvers.Sampler(method, 100), 8)
            y2 = solvers.solve(alt, xt, 0.1, solvers.Sampler(method, 100), 8)
            d = (y1 - y2) / 2
            rows.append({"solver": method, "max": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item()})
    euler = rows[0]
    return {
        "id": "epsnet-t-min",
        "what": "EpsNetModel evaluates the network at max(t, 1e-3) on continuous schedules",
        "authors_code": f"{DIFFPURE}: runners/diffpure_sde.py (Euler only; its last drift evaluation is at "
                        "t = 1.001e-3, its solve ends at 1e-5)",
        "sdepure": "models/base.py EpsNetModel (t_min = 1e-3; 1/T on tables): eps / sqrt(1 - alpha_bar) is singular at t = 0",
        "cell": f"{sig(euler['max'])} with Euler; "
                + " / ".join(r["solver"] for r in rows[1:]) + " RMS " + " / ".join(sig(r["rms"]) for r in rows[1:])
                + " in [0, 1] pixels",
        "size": f"{sig(euler['max'])} with Euler (DiffPure's solver); "
                + ", ".join(f"{r['solver']} RMS {sig(r['rms'])}" for r in rows[1:]) + " in [0, 1] pixels against t >= 1e-5",
        "unit": "[0, 1] pixel units between t_min = 1e-3 and 1e-5 outputs",
        "how": f"t* = 0.1, 100 steps of 1e-3, {n_images} digits test images, the digits eps-network, same noise; "
               "Euler never evaluates below t = dt, midpoint and heun evaluate at t = 5e-4 and 0 in their last step",
        "detail": rows,
    }


# ---------------------------------------------------------------------------------------------
# DiffPure's ImageNet preprocessing
# ---------------------------------------------------------------------------------------------

def smooth_image(h: int = 375, w: int = 500, seed: int = 3):
    """A random smooth RGB image (PIL): a 6 x 8 random grid, bicubic up to h x w, as uint8."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=g)
    img = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def preprocessing_entry() -> dict:
    from PIL import Image

    img = smooth_image()
    # DiffPure: Resize(256) (PIL bilinear), CenterCrop(224), ToTensor (data/datasets.py get_transform 'imval');
    # eval_sde_adv.py: F.interpolate to 256 bilinear before the solve, back to 224 bilinear after
    w, h = img.size
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    r = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    crop = torch.from_numpy(np.asarray(r.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    dp_model_in = F.interpolate(crop, size=(256, 256), mode="bilinear", align_corners=False)
    dp_cls_in = F.interpolate(dp_model_in, size=(224, 224), mode="bilinear", align_corners=False)
    # sdepure's diffpure-imagenet: preprocessing 'densepure' (256 bicubic, crop 256), adapter diffpure-imagenet-224
    cfg = load_config("diffpure-imagenet")
    sd_model_in = preprocess_image(img, **IMAGENET_PREPROCESSING[cfg["data"]["preprocessing"]])[None]
    adapter = InputAdapter(torch.nn.Identity(), **{**PAPER_INPUTS[cfg["classifier"]["adapter"]], "mean": None, "std": None})
    sd_cls_in = adapter.preprocess(sd_model_in)
    # sdepure with DiffPure's own data preprocessing (the 'diffpure' entry), but no 224 -> 256 -> 224 round trip
    dp_data = preprocess_image(img, **IMAGENET_PREPROCESSING["diffpure"])[None]

    def rms(a, b):
        return (a - b).pow(2).mean().sqrt().item()

    rows = {"classifier_input_rms": rms(dp_cls_in, sd_cls_in),
            "classifier_input_max": (dp_cls_in - sd_cls_in).abs().max().item(),
            "diffpure_round_trip_rms": rms(dp_cls_in, crop),
            "sdepure_diffpure_preprocessing_vs_torchvision_crop_rms": rms(dp_data, crop),
            "image": "375 x 500 random smooth RGB (6 x 8 uniform grid, bicubic), uint8"}
    return {
        "id": "diffpure-imagenet-preprocessing",
        "what": "config diffpure-imagenet feeds the diffusion model the 256 x 256 centre crop of the image resized to "
                "256 (bicubic) and shows the classifier all of it at 224 (scale 0.875); DiffPure crops 224 (bilinear "
                "resize), upsamples the crop to 256 (bilinear) for the diffusion model, and the classifier sees the "
                "central 224 x 224 at scale 1 after a 224 -> 256 -> 224 round trip. The Linf budget applies to 224 "
                "pixels in DiffPure, to 256 in sdepure",
        "authors_code": f"{DIFFPURE}: data/datasets.py get_transform (imagenet, 'imval': Resize(256), CenterCrop(224), "
                        "ToTensor); utils.py load_data (base_size=224) and get_image_classifier (_Wrapper_ResNet: "
                        "ImageNet mean/std inside); eval_sde_adv.py SDE_Adv_Model.forward (F.interpolate 256 and 224, "
                        "bilinear, align_corners=False)",
        "sdepure": "imagedata.IMAGENET_PREPROCESSING['densepure'] (Resize 256 bicubic, CenterCrop 256); "
                   "classifiers/external.py PAPER_INPUTS['diffpure-imagenet-224'] (bilinear to 224, no antialias, "
                   "ImageNet mean/std): the same classifier adapter as DiffPure's",
        "cell": f"classifier inputs RMS {sig(rows['classifier_input_rms'])} apart in [0, 1] pixels (random smooth image)",
        "size": f"classifier inputs RMS {sig(rows['classifier_input_rms'])} apart (max {sig(rows['classifier_input_max'])}) "
                f"on a random smooth image; DiffPure's 224 -> 256 -> 224 round trip alone RMS "
                f"{sig(rows['diffpure_round_trip_rms'])}",
        "unit": "[0, 1] pixel units (before normalisation), identity purifier, on a random smooth image",
        "how": "the image through both pipelines with the purifier left out (PIL for DiffPure's Resize/CenterCrop, "
               "F.interpolate as DiffPure calls it); sdepure's side is sdepure.imagedata.preprocess_image and "
               "InputAdapter with the config's settings",
        "detail": rows,
    }


def further_entries() -> list[dict]:
    """Differences found while verifying that have no size without the real checkpoints."""
    return [
        {
            "id": "fp16-unet",
            "what": "DiffPure and DensePure run the guided-diffusion ImageNet UNet in fp16 (model.convert_to_fp16)",
            "authors_code": f"{DIFFPURE} and {DENSEPURE}: configs/imagenet.yml (use_fp16: True); "
                            "runners/diffpure_sde.py RevGuidedDiffusion.__init__, "
                            "runners/diffpure_guided_densepure.py GuidedDiffusion.__init__",
            "sdepure": "fp32 by default; --precision fp16 is autocast, not a weight conversion",
            "cell": "not measured (needs the checkpoint)",
            "size": "not measured (needs the 256x256 checkpoint)",
            "unit": "",
            "how": "",
        },
        {
            "id": "densepure-cifar10-vit-input",
            "what": "DensePure feeds its CIFAR-10 ViT through the Hugging Face AutoFeatureExtractor of "
                    "aaraki/vit-base-patch16-224-in21k-finetuned-cifar10 on numpy arrays in [0, 1]; F.interpolate "
                    "(bicubic, no antialias) is only on its ImageNet path",
            "authors_code": f"{DENSEPURE}: eval_certified_densepure.py DensePure_Certify.forward",
            "sdepure": "config densepure-cifar10: timm ViT-B/16 behind InputAdapter (bicubic to 224, no antialias, "
                       "mean = std = 0.5); its comment attributes this resize to DensePure",
            "cell": "not measured (the extractor's config; transformers unpinned)",
            "size": "not measured (the extractor's resizing is set by the model's preprocessor config and the "
                    "transformers version, unpinned in DensePure's requirements.txt)",
            "unit": "",
            "how": "",
        },
    ]


# ---------------------------------------------------------------------------------------------

TABLE_ROWS = [  # (id, where, the authors' code, sdepure) for the markdown table
    ("densepure-input-scale", "DensePure, input scale",
     "x scaled by sqrt(1/(1+4 sigma^2))", "sqrt(alpha_bar(t*)) of its chain's first step"),
    ("densepure-alpha-bar0", "DensePure ImageNet, respaced chain",
     "alpha_bar[idx] / alpha_bar[0]", "alpha_bar[idx]"),
    ("densepure-cifar10-index", "DensePure CIFAR-10, respaced chain",
     "alpha_bar(idx/T), one table index below the one idx was trained at; real-valued t*",
     "alpha_bar of the index fed; nearest table index for t*"),
    ("densepure-vote-ties", "DensePure, vote ties",
     "first tied label in run order", "lowest tied class index"),
    ("carlini-effective-sigma", "Carlini et al., noise added",
     "sqrt(1 - alpha_bar_t) of the first step reaching 2 sigma", "exactly sigma"),
    ("diffpure-noising", "DiffPure, forward noise",
     "discrete a[t-1], solve with continuous alpha_bar", "continuous alpha_bar for both"),
    ("diffpure-grid-end", "DiffPure, time grid",
     "float32 torchsde grid, ends at t = 1e-5", "float64 grid, ends at t = 0"),
    ("diffpure-unclamped", "DiffPure, classifier input",
     "unclamped solve output", "clamped to [-1, 1]"),
    ("epsnet-t-min", "network time near t = 0",
     "Euler only, never below t = 1.001e-3", "t clamped to >= 1e-3"),
    ("diffpure-imagenet-preprocessing", "DiffPure ImageNet, preprocessing",
     "crop 224, bilinear up to 256 and back to 224", "crop 256 (bicubic), bilinear to 224 for the classifier"),
    ("fp16-unet", "DiffPure / DensePure ImageNet, precision",
     "UNet converted to fp16", "fp32 (autocast on request)"),
    ("densepure-cifar10-vit-input", "DensePure CIFAR-10, ViT input",
     "Hugging Face feature extractor", "bicubic F.interpolate, mean = std = 0.5"),
]


def markdown(entries: list[dict]) -> str:
    """The README table: each entry's short "cell" (its "size" where it has none) in the size column."""
    by_id = {e["id"]: e for e in entries}
    lines = ["| where | the authors' code | sdepure | size |", "| --- | --- | --- | --- |"]
    for eid, where, theirs, ours in TABLE_ROWS:
        e = by_id[eid]
        lines.append(f"| {where} | {theirs} | {ours} | {e.get('cell', e['size'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--md", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "differences.md"),
                    help="write the markdown table here ('' for none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the digits solves are small: a second thread mostly waits)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # nothing below draws from the global generator; this only makes sure of it
    start = time.perf_counter()
    densepure, densepure_fixed = densepure_entries()
    diffpure, diffpure_fixed = diffpure_entries()
    entries = [*densepure, densepure_vote_entry(), carlini_entry(), *diffpure, t_min_entry(),
               preprocessing_entry(), *further_entries()]
    assert [e["id"] for e in entries] == [r[0] for r in TABLE_ROWS]
    json.dump({"seconds": round(time.perf_counter() - start, 1), "differences": entries,
               "fixed": [densepure_fixed, diffpure_fixed]}, sys.stdout, indent=1)
    print()
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(markdown(entries))


if __name__ == "__main__":
    main()
