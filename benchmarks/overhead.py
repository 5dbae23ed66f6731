"""Overhead of sdepure's solvers and of CERTIFY over their network-call floor (issue 9, item 1).

(a) One reverse solve through `sdepure.solvers.solve` against a hand-written loop doing the same
    network calls and the same Gaussian draws (same seeds, so both give the same output: the
    JSON reports the largest difference as a check that the floor does the same work), for
    euler, ddpm, ode-euler and heun, at the digits default shape (250 draws x K=10 rows, 10
    steps, the shipped eps-MLP) and with a tiny MLP, where fixed per-step costs dominate.
(b) One image's CERTIFY (the digits default: DensePure K=10, 10 Euler steps, n0=32, n=400,
    batch 250) against its NFE floor: the score-network and classifier forward passes CERTIFY
    made (recorded by forward hooks, so an early-stopped vote's smaller chunks are replayed as
    they ran), on pre-made inputs of the same shapes, nothing else.
(c) One input gradient of the digits attack default (16 examples, 8 Euler steps, exact
    gradients) with and without recomputation, on 1 and 2 threads, against the same network and
    classifier forward and backward passes alone.

For SDE methods (a) also splits the gap: `sde_loop` steps solve()'s own drift, diffusion and
Brownian motion with a plain loop, so solve - sde_loop is torchsde's machinery and
sde_loop - floor sdepure's per-step work outside the network.

Each figure is the minimum over --repeats runs, the two sides of a ratio alternating in the same
process. Prints one JSON object on stdout and writes a markdown table (--md).

    python benchmarks/overhead.py [--repeats 7] [--threads 1] [--md benchmarks/overhead.md]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from sdepure.classifiers import build_classifier
from sdepure.config import load_config
from sdepure.data import load_digits
from sdepure.models import build_score_model
from sdepure.models.base import EpsNetModel
from sdepure.models.digits import DigitsEpsMLP
from sdepure.defense import Defense, t_star_for
from sdepure.rng import derive_seed
from sdepure.settings import Purifier
from sdepure.schedules import LinearVP
from sdepure.brownian import GridBrownian
from sdepure.sde import ReverseVPSDE, time_grid
from sdepure.smoothing import Smooth
from sdepure.solvers import EXACT_GRAPH_BUDGET, SDE_METHODS, Sampler, ddpm_times, solve

METHODS = ("euler", "ddpm", "ode-euler", "heun")
TARGETS = {"digits": 1.05, "tiny": 1.5, "certify": 1.10}


# ---------------------------------------------------------------- floors: hand-written loops
def _draw(gen: torch.Generator, shape, seed: int, k: int) -> torch.Tensor:
    """The Brownian increment of step k, drawn as GridBrownian does (one re-seeded generator)."""
    gen.manual_seed(derive_seed(seed, k))
    return torch.randn(shape, generator=gen)


def floor_solve(model: EpsNetModel, x: torch.Tensor, t_star: float, steps: int, seed: int, method: str):
    """The same network calls and draws as solve(), with coefficients as Python floats."""
    net, sched, t_min = model.net, model.schedule, model.t_min
    n = x.shape[0]
    gen = torch.Generator()
    if method == "ddpm":
        times = ddpm_times(sched, t_star, steps)
        ab = sched.alpha_bar(times).tolist()
        ab[-1] = 1.0
        times = times.tolist()
        for k in range(len(times) - 1):
            a, a_next = ab[k], ab[k + 1]
            eps = net(x, torch.full((n,), max(times[k], t_min), dtype=x.dtype))
            x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1.0, 1.0)
            alpha = a / a_next
            x = (math.sqrt(a_next) * (1 - alpha) / (1 - a)) * x0 + (math.sqrt(alpha) * (1 - a_next) / (1 - a)) * x
            if k < len(times) - 2:
                x = x + math.sqrt((1 - alpha) * (1 - a_next) / (1 - a)) * _draw(gen, x.shape, seed, k)
        return x
    grid = time_grid(t_star, 0.0, steps).tolist()
    h = grid[0] - grid[1]

    def drift(x, t, weight):  # h beta (x/2 + weight * score), score = -eps / sqrt(1 - alpha_bar)
        te = max(t, t_min)
        std = math.sqrt(-math.expm1(float(sched.log_alpha_bar(torch.tensor(te, dtype=torch.float32)))))
        eps = net(x, torch.full((n,), te, dtype=x.dtype))
        hb = h * float(sched.beta(torch.tensor(t, dtype=torch.float64)))
        return hb * (0.5 * x - (weight / std) * eps)

    def noise_scale(t):
        return math.sqrt(h * float(sched.beta(torch.tensor(t, dtype=torch.float64))))

    for k in range(steps):
        t0, t1 = grid[k], grid[k + 1]
        if method == "ode-euler":
            x = x + drift(x, t0, 0.5)
        elif method == "euler":
            x = x + drift(x, t0, 1.0) + noise_scale(t0) * _draw(gen, x.shape, seed, k)
        elif method == "heun":  # Stratonovich Heun: predictor, then the trapezoid on both ends
            dw = _draw(gen, x.shape, seed, k)
            f0, g0 = drift(x, t0, 1.0), noise_scale(t0) * dw
            xp = x + f0 + g0
            x = x + 0.5 * (f0 + drift(xp, t1, 1.0) + g0 + noise_scale(t1) * dw)
        else:
            raise ValueError(method)
    return x


def sde_loop(model: EpsNetModel, x: torch.Tensor, t_star: float, steps: int, seed: int, method: str):
    """solve()'s own drift, diffusion and Brownian motion (ReverseVPSDE, GridBrownian) stepped by
    a plain loop instead of torchsde: solve - sde_loop is torchsde's machinery, sde_loop - floor
    sdepure's coefficient and model-adapter work."""
    sde = ReverseVPSDE(model, time_grid(t_star, 0.0, steps), x.shape, sde_type=SDE_METHODS[method])
    y = x.reshape(x.shape[0], -1)
    bm = GridBrownian(seed, y.shape, dtype=y.dtype, device=y.device)
    for k in range(steps):
        dw = bm(k, k + 1)
        f, g = sde.f(k, y), sde.g(k, y) * dw
        if method == "euler":
            y = y + f + g
        else:  # heun, as torchsde steps it
            yp = y + f + g
            y = y + (f + sde.f(k + 1, yp) + g + sde.g(k + 1, yp) * dw) * 0.5
    return y.reshape(x.shape)


def nfe(method: str, steps: int) -> int:
    return 2 * steps if method == "heun" else steps


# ---------------------------------------------------------------- timing
def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on shared cores the CPU time is the fairer
    figure, since a longer call is more often preempted by the other jobs."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(*fns, repeats: int) -> dict:
    """Minimum wall and CPU time over repeats of each function, taking turns (after one warm-up
    of each), so that all see the same machine: {"wall": (a, b, ...), "cpu": (a, b, ...)}."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, runs):
            times.append(timed(fn))
    return {"wall": tuple(min(t[0] for t in times) for times in runs),
            "cpu": tuple(min(t[1] for t in times) for times in runs)}


def _figures(times: dict, name: str) -> dict:
    (w_a, w_b), (c_a, c_b) = times["wall"][:2], times["cpu"][:2]
    return {f"{name}_s": w_a, "floor_s": w_b, "ratio": w_a / w_b,
            f"{name}_cpu_s": c_a, "floor_cpu_s": c_b, "cpu_ratio": c_a / c_b}


def _split(times: dict) -> dict:
    """CPU seconds of the gap made of torchsde's machinery and of sdepure's SDE/adapter work."""
    solve_cpu, floor_cpu, loop_cpu = times["cpu"]
    return {"sde_loop_cpu_s": loop_cpu, "gap_torchsde_cpu_s": solve_cpu - loop_cpu,
            "gap_sdepure_cpu_s": loop_cpu - floor_cpu}


def tiny_model() -> EpsNetModel:
    torch.manual_seed(0)
    return EpsNetModel(DigitsEpsMLP(width=16, blocks=1, emb_dim=16), LinearVP()).eval()


def solve_rows(cfg: dict, repeats: int, methods, tiny_rows, with_digits: bool = True) -> list[dict]:
    m = cfg["method"]
    sigma, votes, steps = float(m["sigma"]), int(m["votes"]), int(m["steps"])
    draws = int(cfg["certify"]["batch"])
    digits = build_score_model(cfg["model"])
    x, _ = load_digits("test")
    rows = []
    tiny = tiny_model()
    cases = ([("digits", digits, draws * votes)] if with_digits else []) + [("tiny", tiny, r) for r in tiny_rows]
    for name, model, n in cases:
        t_star = t_star_for(model.schedule, sigma, "densepure")
        gen = torch.Generator().manual_seed(1)
        x0 = x[0].expand(n, *x.shape[1:])
        xt = math.sqrt(float(model.schedule.alpha_bar(torch.tensor(t_star, dtype=torch.float64)))) * \
            (2 * (x0 + sigma * torch.randn(x0.shape, generator=gen)) - 1)
        for method in methods:
            seed = 12345
            with torch.no_grad():
                log = CallLog(net=model.net)
                ref = solve(model, xt, t_star, Sampler(method, steps), seed)
                calls_solve = len(log.calls)
                fl = floor_solve(model, xt, t_star, steps, seed, method)
                calls_floor = len(log.calls) - calls_solve
                log.close()
                # millisecond solves: more repeats, so that some run between the other jobs' time slices
                reps = repeats if name == "digits" else 10 * repeats
                fns = [lambda: solve(model, xt, t_star, Sampler(method, steps), seed),
                       lambda: floor_solve(model, xt, t_star, steps, seed, method)]
                if method in SDE_METHODS:
                    fns.append(lambda: sde_loop(model, xt, t_star, steps, seed, method))
                times = compare(*fns, repeats=reps)
            rows.append({"model": name, "rows": n, "steps": steps, "method": method, "nfe": nfe(method, steps),
                         "repeats": reps,
                         **_figures(times, "solve"),
                         **(_split(times) if method in SDE_METHODS else {}),
                         "target": TARGETS[name], "network_calls": [calls_solve, calls_floor],
                         "max_abs_diff": float((ref - fl).abs().max())})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


class CallLog:
    """Records the input shapes of every forward call of the given modules (forward hooks)."""

    def __init__(self, **modules):
        self.calls: list[tuple[str, tuple]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.calls.append((name, tuple(tuple(a.shape) for a in args if torch.is_tensor(a))))
        return hook

    def close(self):
        for h in self._handles:
            h.remove()


def certify_row(cfg: dict, repeats: int) -> dict:
    m, c = cfg["method"], cfg["certify"]
    sigma, votes, steps, solver = float(m["sigma"]), int(m["votes"]), int(m["steps"]), m["solver"]
    n0, n, alpha, batch = int(c["n0"]), int(c["n"]), float(c["alpha"]), int(c["batch"])
    model = build_score_model(cfg["model"])
    classifier = build_classifier(cfg["classifier"], num_classes=10)
    base = Defense(Purifier(method=m["name"], sigma=sigma, votes=votes, steps=steps, solver=solver), model, classifier, 10)
    smooth = Smooth(base.predict, 10, sigma)
    x, _ = load_digits("test")
    image = x[0]

    def run():
        return smooth.certify(image, n0, n, alpha, batch, seed=7)

    # the floor replays the network and classifier calls CERTIFY makes (recorded by forward hooks:
    # whatever vote or batching it uses), on pre-made inputs of the same shapes, and nothing else
    log = CallLog(net=model.net, classifier=classifier)
    with torch.no_grad():
        result = run()
    log.close()
    gen = torch.Generator().manual_seed(0)
    replay = [(model.net if name == "net" else classifier,
               [torch.rand(shape, generator=gen) * (0.2 if len(shape) == 1 else 1.0) for shape in shapes])
              for name, shapes in log.calls]

    def floor():
        for module, args in replay:
            module(*args)

    with torch.no_grad():
        times = compare(run, floor, repeats=repeats)
    net_rows = [shapes[0][0] for name, shapes in log.calls if name == "net"]
    return {"what": f"CERTIFY one image: {m['name']} K={votes}, {steps} {solver} steps, n0={n0}, n={n}, batch {batch}",
            "prediction": result[0], "radius": result[1],
            "network_calls": len(net_rows), "network_rows": sum(net_rows),
            "classifier_calls": sum(name == "classifier" for name, _ in log.calls),
            **_figures(times, "certify"), "target": TARGETS["certify"]}


def attack_rows(cfg: dict, repeats: int) -> list[dict]:
    """One input gradient of the digits attack default (AttackedModel, 16 examples, exact
    gradients) with and without recomputation, on 1 and 2 threads, against its floor: the same
    network forward and backward passes and the classifier's, nothing else."""
    from torch import nn

    from sdepure.attacks import AttackedModel
    from sdepure.settings import attack_from_config

    settings = attack_from_config(cfg, "autoattack", {})
    p = settings.purifier
    model = build_score_model(cfg["model"])
    classifier = build_classifier(cfg["classifier"], num_classes=10)
    x, y = load_digits("test")
    x, y = x[:settings.batch], y[:settings.batch]
    target = AttackedModel(Defense(p, model, classifier, 10))
    net = model.net
    t_vec = torch.full((x.shape[0],), 0.1)

    def gradient():
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(nn.functional.cross_entropy(target(xg), y), xg)[0]

    def floor():
        xg = x.clone().requires_grad_(True)
        h = xg
        for _ in range(p.steps):
            h = h + 0.01 * net(h, t_vec)
        return torch.autograd.grad(nn.functional.cross_entropy(classifier(h), y), xg)[0]

    rows = []
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for recompute in (True, False):
            target.purifier.graph_budget = 0 if recompute else EXACT_GRAPH_BUDGET
            times = compare(gradient, floor, repeats=repeats)
            rows.append({"what": f"attack gradient: {p.method} t*={p.t_star}, {p.steps} {p.solver} steps, "
                                 f"{x.shape[0]} examples", "threads": threads, "recompute": recompute,
                         **_figures(times, "gradient")})
            print(json.dumps(rows[-1]), file=sys.stderr)
    torch.set_num_threads(before)
    return rows


def markdown(result: dict) -> str:
    lines = [f"Overhead over the network-call floor (min of {result['repeats']} repeats, "
             f"{result['threads']} torch thread(s); {result['note']})", "",
             "| model | rows x steps | method | NFE | solve (s) | floor (s) | ratio | CPU ratio | target | "
             "CPU gap: torchsde / sdepure (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["solve"]:
        split = (f"{1e3 * r['gap_torchsde_cpu_s']:.2f} / {1e3 * r['gap_sdepure_cpu_s']:.2f}"
                 if "gap_torchsde_cpu_s" in r else "")
        lines.append(f"| {r['model']} | {r['rows']} x {r['steps']} | {r['method']} | {r['nfe']} | "
                     f"{r['solve_s']:.4f} | {r['floor_s']:.4f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | "
                     f"<= {r['target']} | {split} |")
    c = result.get("certify")
    if c:
        lines += ["", "| CERTIFY | network + classifier calls | certify (s) | floor (s) | ratio | CPU ratio | target |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {c['what']} | {c['network_calls']} + {c['classifier_calls']} | {c['certify_s']:.3f} | "
                  f"{c['floor_s']:.3f} | {c['ratio']:.3f} | {c['cpu_ratio']:.3f} | <= {c['target']} |"]
    if result.get("attack"):
        lines += ["", "| attack gradient | threads | recompute | gradient (s) | floor (s) | ratio | CPU (s) | CPU ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for a in result["attack"]:
            lines.append(f"| {a['what']} | {a['threads']} | {a['recompute']} | {a['gradient_s']:.4f} | "
                         f"{a['floor_s']:.4f} | {a['ratio']:.3f} | {a['gradient_cpu_s']:.4f} | {a['cpu_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tiny-rows", default="2500,16", help="rows of the tiny-MLP solves (comma-separated)")
    ap.add_argument("--skip-digits", action="store_true", help="only the tiny-MLP solves in (a)")
    ap.add_argument("--parts", default="solve,certify,attack")
    ap.add_argument("--md", default=os.path.join(os.path.dirname(__file__), "overhead.md"),
                    help="markdown table to write ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("digits")
    load0 = os.getloadavg()
    result = {"repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_before": load0,
              "note": "timings on a shared machine are noisy; re-run quietly"}
    parts = args.parts.split(",")
    if "solve" in parts:
        result["solve"] = solve_rows(cfg, args.repeats, args.methods.split(","),
                                     [int(r) for r in args.tiny_rows.split(",") if r], not args.skip_digits)
    if "certify" in parts:
        result["certify"] = certify_row(cfg, args.repeats)
    if "attack" in parts:
        result["attack"] = attack_rows(cfg, 5 * args.repeats)
    result.setdefault("solve", [])
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(markdown(result))


if __name__ == "__main__":
    main()
