"""`sdepure gradcheck`: adjoint gradients against exact backprop, with time and peak memory."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
import resource
import time

import click
import torch

from sdepure import attacks, report
from sdepure.classifiers import build_classifier
from sdepure.config import load_config, merged
from sdepure.data import load_dataset, take
from sdepure.defense import Defense
from sdepure.errors import SdepureError
from sdepure.models import build_score_model
from sdepure.settings import Purifier, as_int
from sdepure.solvers import NO_ADJOINT, SDE_METHODS

from .common import apply_paths, check_out, common_options, default_out, make_out, resolve_device


def _build(spec: dict):
    cfg = apply_paths(load_config(spec["config"]), *spec["paths"])
    dev = torch.device(spec["device"])
    x, y, num_classes = load_dataset(cfg["data"])
    n = min(spec["n_examples"], len(y))
    x, y = take(x, range(n)).to(dev), y[:n].to(dev)
    if spec["dtype"] == "float64":
        x = x.double()
    model = build_score_model(cfg["model"], spec["allow_pickle"]).to(dev)
    classifier = build_classifier(cfg["classifier"], spec["allow_pickle"], num_classes).to(dev)
    if spec["dtype"] == "float64":
        model, classifier = model.double(), classifier.double()
    settings = Purifier(spec["method"], t_star=spec["t_star"], steps=spec["steps"], solver=spec["solver"],
                        grad=spec["grad"], adjoint_method=spec["adjoint_method"])
    target = attacks.AttackedModel(Defense(settings, model, classifier, num_classes), spec["seed"])
    return target, x, y


def measure(spec: dict) -> dict:
    """One input gradient; seconds and peak memory above the state before it. Run it in a fresh
    process on the CPU, where the peak resident set size only grows."""
    target, x, y = _build(spec)
    with torch.no_grad():
        target(x)  # warm up allocator and kernels
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.time()
    grad = attacks.input_gradient(target, x, y, spec["seed"])
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # numpy, not a tensor: torch shares tensors between processes through file descriptors
    # that vanish when the worker exits
    return {"seconds": time.time() - start, "peak_mb": peak / 2 ** 20, "grad": grad.cpu().numpy()}


def _in_fresh_process(spec: dict) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(measure, spec).result()


@click.command()
@click.option("--config", "config_name", default="digits", show_default=True)
@click.option("--method", default="diffpure", show_default=True, help="diffpure or densepure's single run.")
@click.option("--steps", "steps_list", default="10,100", show_default=True, help="Comma-separated step counts.")
@click.option("--solver", default="euler", show_default=True, help="torchsde method (or ode-* for the PF-ODE).")
@click.option("--adjoint-method", help="torchsde adjoint scheme (default: the forward method's own).")
@click.option("--t-star", type=float, help="Diffusion time to purify from (default: the config's [attack]).")
@click.option("--n-examples", type=int, default=4, show_default=True)
@click.option("--float64", "use_float64", is_flag=True, help="Compute in float64 (rounding out of the way).")
@click.option("--same-process", is_flag=True, help="Skip the fresh process per measurement (no memory figure).")
@common_options
def gradcheck(config_name, method, steps_list, solver, adjoint_method, t_star, n_examples, use_float64,
              same_process, seed, device, out, allow_pickle, model_weights, classifier_weights, data_root):
    """Relative error of adjoint input gradients against exact backprop (same noise, same Brownian
    path, same grid), and each mode's time and peak memory, for each number of steps."""
    paths = (model_weights, classifier_weights, data_root)
    cfg = apply_paths(load_config(config_name), *paths)
    if method not in ("diffpure", "densepure"):
        raise SdepureError("gradcheck compares gradients through the reverse process: method diffpure or densepure")
    steps = [as_int("--steps", s.strip(), 1) for s in steps_list.split(",")]
    as_int("--n-examples", n_examples, 1)
    t_star = t_star if t_star is not None else merged(cfg, "attack", {}).get("t_star", 0.1)
    adjoint_mode = "adjoint" if solver in SDE_METHODS else "ode"
    if solver in NO_ADJOINT:
        raise SdepureError(f"the {solver} sampler has no adjoint; choose an SDE or ODE solver")
    for mode in ("exact", adjoint_mode):  # validate both settings before any work
        t_star = Purifier(method, t_star=t_star, steps=steps[0], solver=solver, grad=mode,
                          adjoint_method=adjoint_method if mode == "adjoint" else None).t_star
    dev = resolve_device(device)
    out = check_out(out or default_out("gradcheck", cfg["name"], solver))
    make_out(out)
    rows = []
    click.echo(f"sdepure gradcheck: {method} on {cfg['name']}, t*={t_star}, solver {solver}, "
               f"{n_examples} examples, {'float64' if use_float64 else 'float32'}")
    click.echo(f"{'steps':>6} {'rel. error':>11} {'exact s':>8} {'adjoint s':>9} {'exact MB':>9} {'adjoint MB':>10}")
    for n in steps:
        row = {"steps": n}
        grads = {}
        for mode in ("exact", adjoint_mode):
            spec = {"config": cfg["source"], "device": str(dev), "n_examples": n_examples, "method": method,
                    "t_star": t_star, "steps": n, "solver": solver, "grad": mode, "adjoint_method": adjoint_method,
                    "seed": seed, "allow_pickle": allow_pickle, "paths": paths, "dtype": "float64" if use_float64 else "float32"}
            res = measure(spec) if same_process else _in_fresh_process(spec)
            grads[mode] = torch.from_numpy(res["grad"])
            key = "exact" if mode == "exact" else "adjoint"
            row[f"{key}_seconds"] = res["seconds"]
            row[f"{key}_peak_mb"] = None if same_process and dev.type == "cpu" else res["peak_mb"]
        row["relative_error"] = attacks.relative_error(grads[adjoint_mode], grads["exact"])
        rows.append(row)

        def mb(v):
            return f"{v:.1f}" if v is not None else "-"
        click.echo(f"{n:>6} {row['relative_error']:>11.2e} {row['exact_seconds']:>8.2f} {row['adjoint_seconds']:>9.2f} "
                   f"{mb(row['exact_peak_mb']):>9} {mb(row['adjoint_peak_mb']):>10}")
    report.write_json(out / "gradcheck.json", {
        "command": "gradcheck", "config": cfg["name"], "method": method, "solver": solver,
        "adjoint_method": adjoint_method, "t_star": t_star, "n_examples": n_examples, "seed": seed,
        "dtype": "float64" if use_float64 else "float32", "device": str(dev), "rows": rows,
        "memory": "peak resident set size above the pre-gradient peak, fresh process per measurement"
        if dev.type == "cpu" else "torch.cuda.max_memory_allocated above the allocation before the gradient"})
    click.echo(f"wrote {out}/gradcheck.json")
