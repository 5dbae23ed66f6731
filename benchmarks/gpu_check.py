"""A GPU check in one command (issue 14, item 6), for the day a GPU is at hand:

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--skip-throughput] [--out FILE]
                                   [--only GROUP,...]

On CUDA it runs every path that the project's CPU-only machines never run, on tiny models, and
checks each against the CPU where the two must agree (the CPU stream, rng "cpu"; the device
stream differs by design and is checked statistically):

  cpu_stream_solves    every fixed-step solver (SDE, ODE, ddpm with the learned variance, ddim at
                       eta 0 and 1, dpm-solver-2m) on CUDA equals the CPU's solve, on a tiny MLP
                       (continuous schedule) and a tiny ADM UNet (cosine table, learned sigma)
  device_stream        device-stream draws are standard normal and reproducible, a row's draws do
                       not depend on the rows drawn with it, and device-stream solves are
                       distributed as CPU-stream solves (two-sample z of every pixel's mean and
                       spread)
  autocast             bf16 and fp16 autocast close to fp32 (tests/test_precision.py's bounds)
  channels_last        precision.prepare on CUDA converts the conv weights and keeps the output
  gradients            exact (plain and recomputed), DensePure, adjoint and ODE-adjoint input
                       gradients on CUDA equal the CPU's; adjoint = exact for reversible_heun
  early_stop_vote      the early-stopped vote's labels equal the full vote's and the CPU's
  certify              experiments.certify of a few digits images with rng "cpu" equals the CPU
                       run row for row (under torch's default TF32 settings, as the CLI runs)
  no_sync_per_step     no host synchronisation per solver step (torch.cuda.set_sync_debug_mode
                       "warn", syncs counted at 2 and 4 steps), a new check of the README's claim
  torchrun             `torchrun --standalone --nproc_per_node 2 -m sdepure_cli -- certify ...
                       --device cuda` equals the single-process rows (only with >= 2 GPUs)

then measures draws per second of one-shot denoising (carlini) and of DensePure (K runs of b ddpm
steps, full vote) on an ADM UNet of improved-diffusion's CIFAR-10 architecture with random
weights at 32x32, against the floor of the same network forward passes alone at the same batch,
at fp32 and bf16.

Prints one JSON object on stdout (also written to --out), progress on stderr; every check is a
named entry with pass, the measured difference and its tolerance. Exits 1 if any check fails (an
exception inside a check is a failure), else 0. Without CUDA it prints {"cuda": false, ...} and a
sentence and exits 0. `--device cpu` is the self-test: every check runs CPU against CPU (there
the device stream is the CPU stream, so all agree trivially) on one torch thread, so the script
itself is exercised here (tests/test_gpu_check.py).

Numerical comparisons run with TF32 off (it rounds convolution inputs to 10 mantissa bits, 1e-3
relative, and is on by default for cuDNN convolutions); the certify and torchrun checks and the
throughput run under torch's defaults, as `sdepure` runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdepure import experiments, precision, runs
from sdepure.attacks import AttackedModel, input_gradient, relative_error
from sdepure.brownian import GridBrownian, Streams
from sdepure.classifiers import build_classifier
from sdepure.classifiers.digits import DigitsCNN
from sdepure.config import load_config
from sdepure.data import load_digits
from sdepure.defense import Defense, VoteCost
from sdepure.models import build_score_model
from sdepure.models.adm import ADMUNet, adm_config, adm_eps_model
from sdepure.models.base import EpsNetModel
from sdepure.models.digits import DigitsEpsMLP
from sdepure.rng import Draws
from sdepure.schedules import LinearVP
from sdepure.settings import Purifier, certify_from_config
from sdepure.solvers import SOLVERS, Sampler, solve

PRESET = "improved-cifar10-uncond"

# Tolerances (float32 everywhere, TF32 off). What may differ between CUDA and the CPU is the order
# of summation inside matrix products and convolutions (cuBLAS / cuDNN against ATen / oneDNN): a
# reordered float32 sum of n terms moves by about sqrt(n) * 6e-8 of its size. A wrong draw, time,
# coefficient or layout moves outputs by 1e-2 or more, so the bounds below sit far from both.
TOL = {
    # max abs difference of [-1, 1] images after a few steps of a tiny MLP (sums of <= 64 terms):
    # reordering gives ~1e-6
    "solve_mlp": 1e-5,
    # max abs difference, tiny ADM UNet (random weights, ~20 conv layers of up to 576-term sums
    # with GroupNorms in between): reordering gives ~1e-5
    "solve_adm": 1e-4,
    # |z| of a two-sample or one-sample statistic; with at most a few hundred statistics per
    # check the chance that a correct stream exceeds 4.5 anywhere is about 1e-3
    "z": 4.5,
    # the same addresses drawn twice, or a row drawn with other rows: the same numbers, bit for bit
    # (one generator re-seeded per draw; a solve on one stream runs the same kernels)
    "reproducible": 0.0,
    # tests/test_precision.py: mean abs pixel difference ([0, 1]) of a 10-step purification, the
    # share of labels that agree and the change in accuracy
    "autocast_mean_abs": 0.01, "autocast_labels": 0.95, "autocast_accuracy": 0.03,
    # max abs output difference over max abs output: the same convolutions with NHWC weights
    "channels_last": 1e-4,
    # relative L2 error of input gradients, CUDA against CPU (float32, through 6 to 20 steps)
    "grad": 1e-4,
    # adjoint_reversible_heun against exact backprop in float32 (tests/test_attacks.py's bound on
    # the digits model; measured ~1e-6 there)
    "adjoint_vs_exact": 1e-4,
    # labels and certify rows: the README says they are equal
    "labels": 0, "rows": 0,
    # host synchronisations per solver step: the README says none
    "syncs_per_step": 0,
}


# -- helpers ---------------------------------------------------------------------------------

def entry(difference, tolerance, what, passed=None, **extra) -> dict:
    """One named result: pass (difference <= tolerance unless given), difference, tolerance."""
    ok = (difference <= tolerance) if passed is None else passed
    return {"pass": bool(ok), "difference": difference, "tolerance": tolerance, "what": what, **extra}


def skipped(what: str, reason: str) -> dict:
    return {"pass": None, "difference": None, "tolerance": None, "what": what, "skipped": reason}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| on the host in float64 (a shape mismatch raises)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} against {tuple(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matrix products and cuDNN convolutions (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_flags() -> dict:
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}


def seeded(build, seed: int):
    """build() with torch's global generator seeded, then restored (default initialisations)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ctx:
    """The target device (the CPU in the self-test), the reference (always the CPU), the size."""

    def __init__(self, device: torch.device, quick: bool):
        self.device, self.cpu, self.quick = device, torch.device("cpu"), quick
        self.self_test = device.type == "cpu"
        self.cache: dict = {}

    def pick(self, quick, full):
        return quick if self.quick else full

    def both(self):
        """(target, reference) devices."""
        return self.device, self.cpu


# -- models ----------------------------------------------------------------------------------

def tiny_mlp_model() -> EpsNetModel:
    """A tiny random eps-MLP for 8x8 images on the continuous linear VP schedule."""
    return EpsNetModel(seeded(lambda: DigitsEpsMLP(width=32, blocks=1, emb_dim=16), 0), LinearVP()).eval()


def tiny_adm_net(preset: str = PRESET, randomize: bool = True) -> ADMUNet:
    """The preset's structure at 16 px, width 32, one res block, attention at 8 px (as
    tests/test_adm.py's tiny_config); randomize: every parameter 0.1 N(0, 1), so each one counts."""
    cfg = dict(adm_config(preset), image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
               attention_resolutions=(8,))
    if cfg["num_head_channels"] != -1:
        cfg["num_head_channels"] = 16
    else:
        cfg["num_heads"] = 2
    net = seeded(lambda: ADMUNet(**cfg), 0)
    if randomize:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def tiny_adm_model() -> EpsNetModel:
    """Tiny ADM on improved-diffusion's cosine table (T = 4000), learned sigma, rescaled index input."""
    return adm_eps_model(tiny_adm_net(), PRESET)


def tiny_classifier() -> nn.Module:
    return seeded(lambda: DigitsCNN(ch=4), 1).eval()


def digits_models(ctx: Ctx):
    """The shipped digits eps-network and classifier (CPU copies; callers deep-copy)."""
    if "digits" not in ctx.cache:
        model = build_score_model({"family": "digits-eps-mlp", "weights": "builtin:digits_eps.pt"})
        classifier = build_classifier({"family": "digits-cnn", "weights": "builtin:digits_classifier.pt"}, False, 10)
        ctx.cache["digits"] = (model, classifier)
    return ctx.cache["digits"]


def on(module: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(module).to(device)


def images(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Fixed [-1, 1] inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


MIXED_STREAMS_6 = Streams((5, 5, 5, 6, 6, 6), (0, 1, 2, 2, 0, 1), 3)  # rows from two seeds, reordered
MIXED_STREAMS_4 = Streams((5, 5, 6, 6), (1, 0, 0, 1), 2)


def noise(streams: Streams, x: torch.Tensor, rng: str) -> GridBrownian:
    return GridBrownian(streams, x.shape, x.dtype, x.device, Draws(rng))


def fixed_step_solvers(steps: int) -> list[tuple[str, Sampler]]:
    """Every fixed-step solver (ode-dopri5 adapts its steps: accept/reject decisions on an error
    norm may legitimately differ after float reordering), and ddim at eta 1."""
    cases = [(m, Sampler(m, steps)) for m in SOLVERS if m != "ode-dopri5"]
    return cases + [("ddim-eta1", Sampler("ddim", steps, eta=1.0))]


# -- checks ----------------------------------------------------------------------------------

def check_cpu_stream_solves(ctx: Ctx) -> dict:
    steps = ctx.pick(3, 6)
    out = {}
    mlp, adm = tiny_mlp_model(), tiny_adm_model()
    t_adm = adm.schedule.t_star(0.25, "nearest")
    adm_cases = [("ddpm-learned", Sampler("ddpm", steps, variance="learned")),
                 ("ddpm-posterior", Sampler("ddpm", steps, variance="posterior")),
                 ("euler", Sampler("euler", steps)), ("reversible_heun", Sampler("reversible_heun", steps)),
                 ("ode-euler", Sampler("ode-euler", steps)), ("ddim", Sampler("ddim", steps)),
                 ("ddim-eta1", Sampler("ddim", steps, eta=1.0)), ("dpm-solver-2m", Sampler("dpm-solver-2m", steps))]
    for name, model, x, t_start, streams, cases, tol in (
            ("mlp", mlp, images(6), 0.3, MIXED_STREAMS_6, fixed_step_solvers(steps), TOL["solve_mlp"]),
            ("adm", adm, images(4, 3, 16), t_adm, MIXED_STREAMS_4, adm_cases, TOL["solve_adm"])):
        # by role, not by device: in the self-test both are the CPU, and each still runs on its own copy
        models = [on(model, d) for d in ctx.both()]
        per_solver = {}
        for label, sampler in cases:
            res = []
            with torch.no_grad():
                for m, d in zip(models, ctx.both()):
                    xd = x.to(d)
                    res.append(solve(m, xd, t_start, sampler, noise(streams, xd, "cpu")))
            per_solver[label] = max_abs(*res)
        worst = max(per_solver.values())
        out[f"cpu_stream_solves_{name}"] = entry(
            worst, tol, f"max abs difference, {ctx.device} against the CPU, of {steps}-step solves of the tiny "
            f"{name} with CPU-stream noise (rng cpu), over every solver",
            per_solver=per_solver, t_start=t_start)
    return out


def _two_sample_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |z| over columns of the difference of means, and of spreads ((x - mean)^2), of samples a, b (n, d)."""
    a, b = a.double().cpu(), b.double().cpu()
    worst = 0.0
    for fa, fb in ((a, b), ((a - a.mean(0)) ** 2, (b - b.mean(0)) ** 2)):
        se = (fa.var(0) / len(fa) + fb.var(0) / len(fb)).sqrt()
        diff = (fa.mean(0) - fb.mean(0)).abs()
        z = torch.where(se > 0, diff / se.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
        worst = max(worst, float(z.max()))
    return worst


def check_device_stream(ctx: Ctx) -> dict:
    dev, out = ctx.device, {}
    # 1. standard normal
    n = ctx.pick(1 << 18, 1 << 21)
    z = Draws("device").randn((n,), 12345, dev)
    z64 = z.double().cpu()
    mean_z = float(z64.mean()) * math.sqrt(n)
    var_z = (float(z64.var()) - 1) / math.sqrt(2 / n)
    cpu_z = Draws("cpu").randn((n,), 12345, dev)
    out["device_stream_normal"] = entry(
        max(abs(mean_z), abs(var_z)), TOL["z"], f"|z| of the mean and of the variance of {n} device-stream draws "
        "against N(0, 1)", mean_z=mean_z, variance_z=var_z, dtype=str(z.dtype),
        equals_cpu_stream=bool(torch.equal(z.cpu(), cpu_z.cpu())),
        note="the device stream differs from the CPU stream on CUDA by design and equals it on the CPU")
    # 2. reproducible, and a row's draws independent of the rows drawn with it
    diffs = {}
    diffs["same_seed_twice"] = max_abs(Draws("device").randn((4, 1000), 77, dev),
                                       Draws("device").randn((4, 1000), 77, dev))
    shape = (6, 1, 8, 8)
    x = torch.zeros(shape, device=dev)
    mixed = noise(MIXED_STREAMS_6, x, "device")
    full = {s: noise(Streams.batch(s, 3), torch.zeros(3, 1, 8, 8, device=dev), "device") for s in (5, 6)}
    for k in (0, 3):
        inc = mixed.increment(k)
        ref = torch.stack([full[s].increment(k)[r] for s, r in zip(MIXED_STREAMS_6.seed, MIXED_STREAMS_6.row)])
        diffs[f"rows_alone_vs_together_step{k}"] = max_abs(inc, ref)
        diffs[f"increment_twice_step{k}"] = max_abs(inc, mixed.increment(k))
    model = on(tiny_mlp_model(), dev)
    xs = images(6).to(dev)
    with torch.no_grad():
        a = solve(model, xs, 0.3, Sampler("euler", 4), noise(MIXED_STREAMS_6, xs, "device"))
        b = solve(model, xs, 0.3, Sampler("euler", 4), noise(MIXED_STREAMS_6, xs, "device"))
    diffs["euler_solve_twice"] = max_abs(a, b)
    out["device_stream_reproducible"] = entry(
        max(diffs.values()), TOL["reproducible"], "max abs difference between device-stream draws of the same "
        "addresses: drawn twice, a row drawn alone against with other rows (GridBrownian over mixed Streams), "
        "a 4-step Euler solve run twice", per_case=diffs)
    # 3. device-stream solves distributed as CPU-stream solves
    rows = ctx.pick(1024, 4096)
    x1 = images(1, seed=3).to(dev).expand(rows, 1, 8, 8).contiguous()
    per_solver = {}
    with torch.no_grad():
        for method in ("euler", "ddpm"):
            got = {rng: solve(model, x1, 0.3, Sampler(method, 6), noise(Streams.batch(99, rows), x1, rng)).flatten(1)
                   for rng in ("device", "cpu")}
            per_solver[method] = _two_sample_z(got["device"], got["cpu"])
    out["device_stream_solves_in_distribution"] = entry(
        max(per_solver.values()), TOL["z"], f"max two-sample |z| over the 64 pixels' means and spreads of {rows} "
        "6-step solves of one input, device stream against CPU stream (euler, ddpm)", per_solver=per_solver)
    return out


def check_autocast(ctx: Ctx) -> dict:
    dev, out = ctx.device, {}
    model, classifier = digits_models(ctx)
    x, y = load_digits("test")
    n = ctx.pick(64, 200)
    x, y = x[:n], y[:n]
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).to(dev)
    streams = Streams.batch(1, n)
    result = {}
    for p in ("fp32", "bf16", "fp16"):
        if p == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            continue
        d = Defense(Purifier("diffpure", sigma=0.5, steps=10, solver="euler", precision=p, rng="cpu"),
                    on(model, dev), on(classifier, dev), 10)
        with torch.no_grad():
            purified = d.purify(noisy, streams)
            result[p] = (purified.cpu(), d.classify(purified).argmax(-1).cpu())
    adm = tiny_adm_net(randomize=False).to(dev)
    xa, ta = images(4, 3, 16).to(dev), torch.tensor([7.0, 812.5, 100.0, 999.0], device=dev)
    for p in ("bf16", "fp16"):
        name = f"autocast_{p}"
        if p not in result:
            out[name] = skipped(f"{p} autocast", f"{torch.cuda.get_device_name(dev)} does not support bf16")
            continue
        diff = float((result[p][0] - result["fp32"][0]).abs().mean())
        agree = float((result[p][1] == result["fp32"][1]).double().mean())
        acc = {q: float((result[q][1] == y).double().mean()) for q in ("fp32", p)}
        with torch.no_grad():
            adm_out = precision.run(adm, xa, ta, precision=p)
        finite = bool(torch.isfinite(adm_out).all())
        ok = (0 < diff <= TOL["autocast_mean_abs"] and agree >= TOL["autocast_labels"]
              and abs(acc[p] - acc["fp32"]) <= TOL["autocast_accuracy"] and finite and adm_out.dtype == torch.float32
              and result[p][0].dtype == torch.float32)
        out[name] = entry(
            diff, TOL["autocast_mean_abs"], f"mean abs pixel difference ([0, 1]) of {p} autocast against fp32, one "
            f"10-step Euler purification of {n} noisy digits (shipped models, sigma 0.5, same noise); also > 0 "
            f"(autocast changed the arithmetic), labels agree on >= {TOL['autocast_labels']}, accuracy within "
            f"{TOL['autocast_accuracy']}, outputs fp32, and a tiny ADM UNet's output finite under {p}",
            passed=ok, label_agreement=agree, accuracy=acc, adm_finite=finite)
    return out


def check_channels_last(ctx: Ctx) -> dict:
    dev = ctx.device
    nets = {"adm-guided": (tiny_adm_net("guided-256-uncond"), 3, 16),
            "adm-improved": (tiny_adm_net(PRESET), 3, 16),
            "digits-cnn": (digits_models(ctx)[1], 1, 8)}
    per_net, converted = {}, {}
    for name, (net, channels, size) in nets.items():
        plain = on(net, dev)
        prepared = on(net, dev)
        # what Defense does: prepare() converts on CUDA by itself; the CPU self-test forces it
        precision.prepare(prepared, channels_last=None if dev.type == "cuda" else True)
        convs = [m for m in prepared.modules() if isinstance(m, nn.Conv2d)]
        converted[name] = all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        x = images(5, channels, size).to(dev)
        args = (x, torch.tensor([7.0, 812.5, 100.0, 999.0, 3.0], device=dev)) if name.startswith("adm") else (x,)
        with torch.no_grad():
            ref, got = plain(*args), prepared(*args)
        per_net[name] = max_abs(got, ref) / max(float(ref.abs().max()), 1e-30)
    worst = max(per_net.values())
    return {"channels_last": entry(
        worst, TOL["channels_last"], "max abs output difference / max abs output of precision.prepare'd networks "
        "(channels_last conv weights) against the same networks contiguous: tiny ADM (guided, improved), "
        "shipped digits CNN; and every conv weight converted", passed=worst <= TOL["channels_last"]
        and all(converted.values()), per_net=per_net, converted=converted)}


def _gradient(ctx: Ctx, device, purifier: Purifier, budget: int | None = None):
    """Input gradient of one draw (seed 3) of a tiny MLP + tiny CNN defense on 4 digits; and
    the solver's gradient mode it ran with."""
    x, y = load_digits("test")
    x, y = x[:4].to(device), y[:4].to(device)
    defense = Defense(purifier, on(tiny_mlp_model(), device), on(tiny_classifier(), device), 10)
    if budget is not None:
        defense.graph_budget = budget
    g = input_gradient(AttackedModel(defense, 3), x, y, 3)
    mode = None
    if defense.sampler is not None and purifier.grad == "exact":
        with torch.enable_grad():
            mode = defense.solver_grad(defense.x_t_star(x))
    return g.detach().cpu(), mode


def check_gradients(ctx: Ctx) -> dict:
    out = {}
    cases = {
        "grad_exact": (Purifier("diffpure", t_star=0.15, steps=20, solver="euler", grad="exact", rng="cpu"), None,
                       "exact gradient, 20 Euler steps, plain autograd graph (fits the budget)"),
        "grad_exact_recomputed": (Purifier("diffpure", t_star=0.15, steps=20, solver="euler", grad="exact", rng="cpu"),
                                  0, "exact gradient, 20 Euler steps, graph budget 0 on the target: recomputed "
                                  "network calls and sqrt(steps) segments (against the CPU's plain graph)"),
        "grad_exact_densepure": (Purifier("densepure", t_star=0.15, votes=3, steps=6, solver="ddpm", grad="exact",
                                          rng="cpu"), None, "DensePure (K=3, 6 ddpm steps) mean-logit exact gradient"),
        "grad_adjoint": (Purifier("diffpure", t_star=0.15, steps=10, solver="reversible_heun", grad="adjoint",
                                  rng="cpu"), None, "torchsde adjoint (adjoint_reversible_heun), 10 steps"),
        "grad_ode_adjoint": (Purifier("diffpure", t_star=0.15, steps=10, solver="ode-euler", grad="ode", rng="cpu"),
                             None, "torchdiffeq odeint_adjoint, 10 probability-flow Euler steps"),
    }
    for name, (purifier, budget, what) in cases.items():
        g_dev, mode = _gradient(ctx, ctx.device, purifier, budget)
        g_cpu, _ = _gradient(ctx, ctx.cpu, purifier)
        err = relative_error(g_dev, g_cpu)
        extra = {"solver_grad": mode} if mode is not None or purifier.grad == "exact" else {}
        ok = err <= TOL["grad"] and float(g_cpu.abs().sum()) > 0
        if budget == 0:
            ok = ok and mode == "exact"  # recomputation did run
        out[name] = entry(err, TOL["grad"], f"relative L2 error of the input gradient, {ctx.device} against the CPU "
                          f"(rng cpu): {what}", passed=ok, **extra)
    rh = {m: _gradient(ctx, ctx.device, Purifier("diffpure", t_star=0.15, steps=10, solver="reversible_heun",
                                                 grad=m, rng="cpu"))[0] for m in ("exact", "adjoint")}
    out["adjoint_vs_exact"] = entry(relative_error(rh["adjoint"], rh["exact"]), TOL["adjoint_vs_exact"],
                                    f"relative L2 error of the adjoint input gradient against exact backprop on "
                                    f"{ctx.device}, reversible_heun, 10 steps, same noise and Brownian path")
    return out


class RowCounter:
    """Rows and calls through a module's forward (a pre-hook), removable."""

    def __init__(self, module: nn.Module):
        self.rows = self.calls = 0
        self.shapes: set = set()
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1
        self.shapes.add(tuple(args[0].shape))

    def remove(self):
        self._handle.remove()


def check_early_stop_vote(ctx: Ctx) -> dict:
    model, classifier = digits_models(ctx)
    x, _ = load_digits("test")
    n = ctx.pick(24, 64)
    noisy = x[:n] + 0.5 * torch.randn(x[:n].shape, generator=torch.Generator().manual_seed(0))
    labels, rows = {}, {}
    for key, device, early in (("early", ctx.device, True), ("full", ctx.device, False), ("early_cpu", ctx.cpu, True)):
        d = Defense(Purifier("densepure", sigma=0.5, votes=9, steps=4, solver="ddpm", rng="cpu", early_stop=early),
                    on(model, device), on(classifier, device), 10)
        d.vote_cost = VoteCost(0.0, 1.0)  # rounds as a one-at-a-time vote's, whatever this machine's costs
        counter = RowCounter(d.classifier)
        with torch.no_grad():
            labels[key] = d.predict(noisy.to(device), 11).cpu()
        rows[key] = counter.rows
        counter.remove()
    mismatches = {"early_vs_full": int((labels["early"] != labels["full"]).sum()),
                  "early_vs_cpu": int((labels["early"] != labels["early_cpu"]).sum())}
    return {"early_stop_vote": entry(
        max(mismatches.values()), TOL["labels"], f"labels that differ: the early-stopped vote on {ctx.device} against "
        f"the full vote there and against the CPU's early-stopped vote (DensePure K=9, 4 ddpm steps, {n} noisy "
        "digits, rng cpu)", per_case=mismatches, classifier_rows={"early": rows["early"], "full": rows["full"]})}


def certify_flags(ctx: Ctx) -> dict:
    """The flat settings (as `sdepure certify` flags) of the certify and torchrun checks."""
    return dict(name="densepure", sigma=0.5, votes=4, steps=3, solver="ddpm", rng="cpu", n0=ctx.pick(8, 16),
                n=ctx.pick(32, 100), alpha=0.001, batch=ctx.pick(20, 50), start=0, stop=ctx.pick(12, 60), skip=4,
                seed=0)


def _certify_rows(cfg, settings, device) -> tuple[list[tuple], dict]:
    """(idx, label, predict, radius as certify.tsv writes it, correct) per image, and the summary."""
    summary = experiments.certify(cfg, settings, device)
    return [(r["idx"], r["label"], r["predict"], f"{r['radius']:.4f}", r["correct"]) for r in summary["rows"]], summary


def cpu_certify_rows(ctx: Ctx):
    if "certify_cpu" not in ctx.cache:
        cfg = load_config("digits")
        settings = certify_from_config(cfg, certify_flags(ctx))
        ctx.cache["certify_cpu"] = _certify_rows(cfg, settings, ctx.cpu)
    return ctx.cache["certify_cpu"]


def check_certify(ctx: Ctx) -> dict:
    cfg = load_config("digits")
    settings = certify_from_config(cfg, certify_flags(ctx))
    ref, ref_summary = cpu_certify_rows(ctx)
    got, summary = _certify_rows(cfg, settings, ctx.device)
    differing = sum(a != b for a, b in zip(got, ref)) + abs(len(got) - len(ref))
    extra = {"rows": len(ref), "tf32": tf32_flags(), "certified_accuracy": summary["certified_accuracy"]}
    if differing and ctx.device.type == "cuda":
        with strict_fp32():
            strict, _ = _certify_rows(cfg, settings, ctx.device)
        extra["rows_differing_with_tf32_off"] = sum(a != b for a, b in zip(strict, ref))
    device_settings = certify_from_config(cfg, {**certify_flags(ctx), "rng": "device"})
    _, device_summary = _certify_rows(cfg, device_settings, ctx.device)
    extra["device_stream_certified_accuracy"] = device_summary["certified_accuracy"]
    extra["cpu_stream_certified_accuracy"] = ref_summary["certified_accuracy"]
    return {"certify_rows_cpu_stream": entry(
        differing, TOL["rows"], f"certify rows (idx label predict radius correct) that differ, experiments.certify on "
        f"{ctx.device} against the CPU, rng cpu, DensePure K=4, 3 ddpm steps on {len(ref)} digits images, "
        "torch's default TF32 settings (as sdepure runs); the device-stream run's accuracy beside it for "
        "information", **extra)}


class HostReads(TorchDispatchMode):
    """The CPU self-test's stand-in for the CUDA sync counter: host reads of values held on a
    device other than the CPU (none exist there, so it counts 0)."""

    def __init__(self):
        super().__init__()
        self.count, self.where = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.count += 1
        return func(*args, **kwargs)


def count_syncs(device: torch.device, fn) -> tuple[int, list[str]]:
    """(synchronisations, where): on CUDA the ones torch reports under set_sync_debug_mode("warn")
    (blocking copies, .item(), nonzero, stream syncs...), each with the Python line that asked."""
    if device.type != "cuda":
        with HostReads() as watch:
            fn()
        return watch.count, watch.where
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    return len(hits), sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})


def _per_step(device, run) -> dict:
    """run(steps) counted at 2 and 4 steps after a warm-up: syncs per step and the rest (set-up)."""
    run(2)
    c2, where2 = count_syncs(device, lambda: run(2))
    c4, where4 = count_syncs(device, lambda: run(4))
    per_step = (c4 - c2) / 2
    return {"per_step": per_step, "setup": c2 - 2 * per_step, "where": sorted(set(where2) | set(where4))[:6]}


def check_no_sync_per_step(ctx: Ctx) -> dict:
    dev = ctx.device
    control, _ = count_syncs(dev, lambda: float(torch.ones(2, device=dev).sum()))
    mlp, adm = on(tiny_mlp_model(), dev), on(tiny_adm_model(), dev)
    t_adm = adm.schedule.t_star(0.25, "nearest")
    per = {}
    cases = [("mlp", mlp, images(6).to(dev), 0.3, MIXED_STREAMS_6),
             ("adm", adm, images(4, 3, 16).to(dev), t_adm, MIXED_STREAMS_4)]
    if ctx.self_test and ctx.quick:
        cases = cases[:1]  # the CPU counter sees nothing anyway; the ADM solves only cost time
    for name, model, x, t0, streams in cases:
        for method, _ in fixed_step_solvers(2):
            if method == "ddim-eta1":
                continue
            noisy = not Sampler(method, 2).deterministic
            for rng in ("device", "cpu") if noisy else ("device",):
                def run(steps, model=model, x=x, t0=t0, method=method, rng=rng, streams=streams):
                    with torch.no_grad():
                        return solve(model, x, t0, Sampler(method, steps), noise(streams, x, rng))
                per[f"{name}/{method}/{rng}"] = _per_step(dev, run)
    # the defense around the solver: DensePure's K=3 runs of each row (Streams.runs), then the classifier
    x01 = (images(6).to(dev) + 1) / 2
    for rng in ("device", "cpu"):
        defenses = {s: Defense(Purifier("densepure", sigma=0.5, votes=3, steps=s, solver="ddpm", rng=rng), mlp,
                               on(tiny_classifier(), dev), 10) for s in (2, 4)}

        def run(steps, defenses=defenses):
            with torch.no_grad():
                return defenses[steps].run_logits(x01, MIXED_STREAMS_6, range(3))
        per[f"defense-densepure/ddpm/{rng}"] = _per_step(dev, run)
    # gradients (information only: the README's claim is about the solvers' step loops)
    grads = {}
    for method, grad in (("euler", "exact"), ("reversible_heun", "adjoint")):
        def run(steps, method=method, grad=grad):
            xg = images(6).to(dev).requires_grad_(True)
            y = solve(mlp, xg, 0.3, Sampler(method, steps), noise(MIXED_STREAMS_6, xg, "device"), grad=grad)
            return torch.autograd.grad(y.square().sum(), xg)[0]
        grads[f"mlp/{method}/{grad}"] = _per_step(dev, run)
    worst = max(v["per_step"] for v in per.values())
    counter = "torch.cuda.set_sync_debug_mode('warn')" if dev.type == "cuda" else \
        "host reads of non-CPU values (none exist in the CPU self-test)"
    ok = worst <= TOL["syncs_per_step"] and (control >= 1 or dev.type != "cuda")
    return {"no_sync_per_step": entry(
        worst, TOL["syncs_per_step"], "host synchronisations per solver step (count at 4 steps minus at 2, halved) of "
        "every fixed-step solver with rng device and cpu, on a tiny MLP (continuous schedule) and a tiny ADM "
        "(table schedule), and of DensePure's run_logits (ode-dopri5 is left out: its step-size control reads "
        "the error estimate on the host, by design); the counter must see the .item() of a control",
        passed=ok, counter=counter, control_syncs=control, models=[c[0] for c in cases], per_solver=per,
        gradients_information_only=grads)}


def check_torchrun(ctx: Ctx) -> dict:
    what = ("rows that differ between `torchrun --standalone --nproc_per_node 2 -m sdepure_cli -- certify ...` "
            "(2 ranks, rng cpu) and the single-process CPU run")
    if ctx.device.type == "cuda":
        if torch.cuda.device_count() < 2:
            return {"torchrun_2_ranks": skipped(what, f"{torch.cuda.device_count()} CUDA device(s); needs 2")}
        device = "cuda"
    elif ctx.quick:
        return {"torchrun_2_ranks": skipped(what, "--quick CPU self-test (tests/test_torchrun.py runs 2 CPU ranks)")}
    else:
        device = "cpu"
    ref, _ = cpu_certify_rows(ctx)
    flags = []
    for key, value in certify_flags(ctx).items():
        flags += [f"--{'method' if key == 'name' else key.replace('_', '-')}", str(value)]
    script = Path(sys.executable).parent / "torchrun"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "sdepure_cli", "--", "certify",
                   "--config", "digits", *flags, "--device", device, "--out", str(out)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            return {"torchrun_2_ranks": entry(None, TOL["rows"], what, passed=False, returncode=proc.returncode,
                                              stderr_tail=proc.stderr[-2000:])}
        got = [(r["idx"], r["label"], r["predict"], f"{r['radius']:.4f}", r["correct"]) for r in runs.load_rows(out)]
        shards = sorted(p.name for p in out.iterdir() if p.name.startswith("shard-"))
    differing = sum(a != b for a, b in zip(got, ref)) + abs(len(got) - len(ref))
    return {"torchrun_2_ranks": entry(differing, TOL["rows"], what, rows=len(ref), shards=shards, device=device)}


CHECKS = {
    "cpu_stream_solves": (check_cpu_stream_solves, True),
    "device_stream": (check_device_stream, True),
    "autocast": (check_autocast, True),
    "channels_last": (check_channels_last, True),
    "gradients": (check_gradients, True),
    "early_stop_vote": (check_early_stop_vote, True),
    "certify": (check_certify, False),          # torch's default TF32 settings, as sdepure runs
    "no_sync_per_step": (check_no_sync_per_step, True),
    "torchrun": (check_torchrun, False),
}


# -- throughput --------------------------------------------------------------------------------

def _timed(device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _measure(ctx: Ctx, model: EpsNetModel, classifier: nn.Module, size: int, method: str, p: str, rng: str,
             rows: int, votes: int, steps: int, repeats: int) -> dict:
    dev = ctx.device
    purifier = Purifier(method, sigma=0.25, votes=votes if method == "densepure" else 1, steps=steps, solver="ddpm",
                        precision=p, rng=rng, early_stop=False)
    defense = Defense(purifier, model, classifier, 10)
    k = defense.votes
    draws = rows // k
    g = torch.Generator().manual_seed(0)
    shape = (draws, 3, size, size)
    x_noisy = (torch.rand(shape, generator=g) + 0.25 * torch.randn(shape, generator=g)).to(dev)
    counter = RowCounter(model.net)
    with torch.no_grad():
        defense.predict(x_noisy, 5)  # warm-up, and the network calls one prediction makes
    counter.remove()
    calls, shapes = counter.calls, sorted(counter.shapes)
    x_rows = torch.randn(*shapes[-1], generator=g).to(dev) if shapes else None
    t_rows = torch.full((shapes[-1][0],), 100.0, device=dev) if shapes else None
    purified = torch.rand(draws * k, 3, size, size, generator=g).to(dev)

    def predict():
        with torch.no_grad():
            defense.predict(x_noisy, 5)

    def floor():  # the same network calls at the same batch, and the classifier's, nothing else
        with torch.no_grad(), precision.autocast(dev, p):
            for _ in range(calls):
                model.net(x_rows, t_rows)
        with torch.no_grad():
            defense.classify(purified)

    floor()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, floors = [], []
    for _ in range(repeats):  # in turns, so both see the same machine
        times.append(_timed(dev, predict))
        floors.append(_timed(dev, floor))
    t, f = statistics.median(times), statistics.median(floors)
    return {"method": method, "precision": p, "rng": rng, "votes": k, "steps": steps if method == "densepure" else None,
            "draws_per_call": draws, "network_calls": calls, "rows_per_network_call": shapes[-1][0] if shapes else None,
            "seconds": t, "floor_seconds": f, "draws_per_second": draws / t, "floor_draws_per_second": draws / f,
            "ratio_to_floor": t / f, "repeats": repeats,
            "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None}


def throughput(ctx: Ctx) -> dict:
    dev = ctx.device
    if ctx.self_test:
        net, size = tiny_adm_net(randomize=False), 16
        rows, votes, steps, repeats = 8, 2, 2, 2
        network = "tiny improved-cifar10 structure, 16 px, width 32 (CPU self-test; the CIFAR-10 network is for GPUs)"
    else:
        net, size = seeded(lambda: ADMUNet(**adm_config(PRESET)), 0).eval(), 32
        rows, votes, steps, repeats = ctx.pick(64, 256), 4, ctx.pick(2, 5), ctx.pick(3, 10)
        network = f"ADMUNet(**adm_config({PRESET!r})), random weights (PyTorch's default initialisation), 32x32"
    model = adm_eps_model(net.to(dev), PRESET)
    classifier = seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 10)), 0).to(dev).eval()
    low = "bf16" if dev.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    cases = []
    for p in ("fp32", low):
        for method, rng in (("carlini", "device"), ("densepure", "device"), ("densepure", "cpu")):
            if rng == "cpu" and p != "fp32":
                continue
            cases.append(_measure(ctx, model, classifier, size, method, p, rng, rows, votes, steps, repeats))
            print(f"gpu_check: throughput {method} {p} rng {rng}: {cases[-1]['draws_per_second']:.1f} draws/s "
                  f"({cases[-1]['ratio_to_floor']:.2f} x floor)", file=sys.stderr)
    return {"network": network, "parameters": sum(q.numel() for q in net.parameters()), "rows_per_network_call": rows,
            "classifier": "Flatten + Linear (in the floor as well)", "tf32": tf32_flags(),
            "floor": "the network forward passes one prediction makes (counted by a hook), on pre-made inputs of "
                     "the same shape under the same autocast, plus the classifier on the purified rows",
            "densepure": f"K={votes} runs of {steps} ddpm steps (learned variance), full vote (early_stop=False)",
            "statistic": f"median of {repeats} timed calls after a warm-up, predict and floor in turns",
            "cases": cases}


# -- main --------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
           "platform": platform.platform(), "torch_threads": torch.get_num_threads(), "tf32_defaults": tf32_flags()}
    if device.type == "cuda":
        env.update({"gpu": torch.cuda.get_device_name(device),
                    "capability": list(torch.cuda.get_device_capability(device)), "gpus": torch.cuda.device_count(),
                    "cudnn": torch.backends.cudnn.version(),
                    "bf16_supported": torch.cuda.is_bf16_supported()})
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _clean(obj):
    """JSON-safe: non-finite floats as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit(result: dict, out: str | None, indent) -> None:
    text = json.dumps(_clean(result), indent=indent)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def run_checks(ctx: Ctx, only) -> dict:
    checks = {}
    for group, (fn, strict) in CHECKS.items():
        if only and group not in only:
            continue
        start = time.time()
        try:
            with strict_fp32() if strict else contextlib.nullcontext():
                results = fn(ctx)
        except Exception as e:  # a check that crashes has failed; the others still run
            results = {group: {"pass": False, "difference": None, "tolerance": None, "what": group,
                               "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc(limit=-6).splitlines()[-14:]}}
        took = time.time() - start
        for name, res in results.items():
            res["seconds"] = round(took, 3)
            checks[name] = res
            state = {True: "ok", False: "FAIL", None: "skipped"}[res["pass"]]
            print(f"gpu_check: {name}: {state} (difference {res['difference']}, tolerance {res['tolerance']})"
                  + (f" {res.get('error', '')}" if res["pass"] is False and "error" in res else ""), file=sys.stderr)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda",
                    help="cuda (default) or cuda:N; cpu is the self-test (every check CPU against CPU)")
    ap.add_argument("--quick", action="store_true", help="fewer draws, images and repeats")
    ap.add_argument("--skip-throughput", action="store_true", help="the checks only")
    ap.add_argument("--only", help=f"comma-separated check groups: {', '.join(CHECKS)}")
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    only = [g.strip() for g in args.only.split(",")] if args.only else None
    if only and set(only) - set(CHECKS):
        unknown = ", ".join(sorted(set(only) - set(CHECKS)))
        ap.error(f"unknown check group(s) {unknown}; choose from {', '.join(CHECKS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"unknown device {args.device!r}")
    if device.type not in ("cuda", "cpu"):
        ap.error("--device must be cuda, cuda:N or cpu (the self-test)")
    if device.type == "cuda" and not torch.cuda.is_available():
        emit({"cuda": False, "device": args.device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "checks": {}, "failed": []}, args.out, None)
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False), so there is nothing to check; "
              "`--device cpu` runs the same checks CPU against CPU.", file=sys.stderr)
        return 0
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            ap.error(f"{device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # small networks on shared cores: a second thread only spin-waits
    try:
        start = time.time()
        ctx = Ctx(device, args.quick)
        result = {"cuda": torch.cuda.is_available(), "device": str(device), "self_test": ctx.self_test,
                  "quick": args.quick, "environment": environment(device), "tolerances": TOL}
        checks = run_checks(ctx, only)
        result["checks"] = checks
        result["failed"] = [n for n, r in checks.items() if r["pass"] is False]
        result["skipped"] = [n for n, r in checks.items() if r["pass"] is None]
        result["passed"] = sum(r["pass"] is True for r in checks.values())
        result["throughput"] = None
        if not args.skip_throughput:
            try:
                result["throughput"] = throughput(ctx)
            except Exception as e:  # a measurement is no check: reported, not failed
                result["throughput"] = {"error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc(limit=-6).splitlines()[-14:]}
        result["seconds"] = time.time() - start
    finally:
        torch.set_num_threads(threads)
    emit(result, args.out, 1)
    print(f"gpu_check: {len(checks)} checks on {device}: {result['passed']} passed, {len(result['failed'])} failed"
          + (f" ({', '.join(result['failed'])})" if result["failed"] else "")
          + f", {len(result['skipped'])} skipped; {result['seconds']:.1f} s", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
