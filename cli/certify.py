"""`sdepure certify`: certified L2 accuracy of a purified classifier by randomized smoothing."""
from __future__ import annotations

import time

import click
import numpy as np
import torch
from tqdm import tqdm

from sdepure import purify, report
from sdepure.classifiers import build_classifier
from sdepure.config import load_config, merged
from sdepure.data import load_dataset
from sdepure.errors import SdepureError
from sdepure.models import build_score_model
from sdepure.smoothing import Smooth, certify_images, check_params
from sdepure.solvers import SOLVERS, check_solver

from .common import apply_paths, check_out, common_options, default_out, make_out, resolve_device

DEFAULTS = {"method": {"name": "densepure", "sigma": 0.5, "votes": 10, "steps": 10, "solver": "euler"},
            "certify": {"n0": 100, "n": 1000, "alpha": 0.001, "batch": 100, "start": 0, "stop": None, "skip": 1}}


def settings(cfg: dict, method_over: dict, certify_over: dict) -> tuple[dict, dict]:
    m = {**DEFAULTS["method"], **merged(cfg, "method", method_over)}
    c = {**DEFAULTS["certify"], **merged(cfg, "certify", certify_over)}
    if m["name"] not in purify.METHODS:
        raise SdepureError(f"unknown method {m['name']!r}; choose from {', '.join(purify.METHODS)}")
    if m["name"] != "densepure":
        if method_over.get("votes") not in (None, 1):
            raise SdepureError(f"--votes applies to densepure only (method is {m['name']})")
        m["votes"] = 1
    try:
        m["sigma"], c["alpha"] = float(m["sigma"]), float(c["alpha"])
        for key in ("votes", "steps"):
            m[key] = int(m[key])
        for key in ("n0", "n", "batch", "start", "skip"):
            c[key] = int(c[key])
    except (TypeError, ValueError) as e:
        raise SdepureError(f"bad number in settings: {e}") from None
    check_params(m["sigma"], c["alpha"], c["n0"], c["n"], c["batch"])
    if m["votes"] < 1:
        raise SdepureError(f"votes must be >= 1, got {m['votes']}")
    if m["steps"] < 1:
        raise SdepureError(f"steps must be >= 1, got {m['steps']}")
    check_solver(m["solver"])
    if c["skip"] < 1 or c["start"] < 0:
        raise SdepureError(f"need start >= 0 and skip >= 1, got start={c['start']}, skip={c['skip']}")
    return m, c


@click.command()
@click.option("--config", "config_name", default="digits", show_default=True,
              help="Shipped config name or path to a TOML file.")
@click.option("--method", type=str, help=f"One of {', '.join(purify.METHODS)}.")
@click.option("--sigma", type=float, help="Smoothing noise on [0, 1] images.")
@click.option("--n0", type=int, help="Noise draws to select the top class.")
@click.option("--n", "n", type=int, help="Noise draws to estimate its probability.")
@click.option("--alpha", type=float, help="Failure probability of each certificate.")
@click.option("--votes", type=int, help="DensePure: reverse runs per noise draw (K).")
@click.option("--steps", type=int, help="Reverse-process steps.")
@click.option("--solver", type=str, help=f"One of {', '.join(SOLVERS)}.")
@click.option("--batch", type=int, help="Noise draws per forward pass (x votes rows).")
@click.option("--start", type=int, help="First test image index.")
@click.option("--stop", type=int, help="Stop before this image index.")
@click.option("--skip", type=int, help="Take every skip-th image.")
@common_options
def certify(config_name, method, sigma, n0, n, alpha, votes, steps, solver, batch, start, stop, skip,
            seed, device, out, allow_pickle, model_weights, classifier_weights, data_root):
    """Certify a purified classifier with randomized smoothing (Cohen et al.).

    Writes certify.tsv (idx label predict radius correct time), certified_accuracy.png and
    summary.json to --out, and prints certified accuracy at a range of L2 radii."""
    t0 = time.time()
    cfg = apply_paths(load_config(config_name), model_weights, classifier_weights, data_root)
    m, c = settings(cfg, dict(name=method, sigma=sigma, votes=votes, steps=steps, solver=solver),
                    dict(n0=n0, n=n, alpha=alpha, batch=batch, start=start, stop=stop, skip=skip))
    dev = resolve_device(device)
    out = check_out(out or default_out("certify", cfg["name"], m["name"], f"sigma{m['sigma']}"))

    x, y, num_classes = load_dataset(cfg["data"])
    stop_ = len(x) if c["stop"] is None else min(int(c["stop"]), len(x))
    indices = list(range(c["start"], stop_, c["skip"]))
    if not indices:
        raise SdepureError(f"no images selected: start={c['start']} stop={stop_} skip={c['skip']} "
                           f"of {len(x)} images")
    model = build_score_model(cfg["model"], allow_pickle).to(dev) if m["name"] != "none" else None
    classifier = build_classifier(cfg["classifier"], allow_pickle, num_classes).to(dev)
    base = purify.build(m["name"], model, classifier, num_classes, m["sigma"], votes=m["votes"],
                        steps=m["steps"], solver=m["solver"], t_rule=m.get("t_rule"))
    t_star = getattr(base.purifier, "t_star", None)
    smooth = Smooth(base.predict, num_classes, m["sigma"])

    click.echo(f"sdepure certify: {m['name']} on {cfg['name']} ({len(indices)} images: "
               f"{c['start']}:{stop_}:{c['skip']} of {len(x)}), sigma={m['sigma']}"
               + (f", t*={t_star:.4f}" if t_star is not None else "")
               + (f", votes K={m['votes']}" if m["name"] == "densepure" else "")
               + (f", {m['steps']} {m['solver']} steps" if m["name"] in ("diffpure", "densepure") else ""))
    click.echo(f"  n0={c['n0']} n={c['n']} alpha={c['alpha']} batch={c['batch']} seed={seed} "
               f"device={dev} out={out}")

    make_out(out)
    with open(out / "certify.tsv", "w") as tsv, \
            tqdm(total=len(indices) * (c["n0"] + c["n"]), unit="draw", desc="certify", leave=False) as bar:
        tsv.write(report.TSV_HEADER + "\n")
        with torch.no_grad():
            rows = certify_images(smooth, x, y, indices, c["n0"], c["n"], c["alpha"], c["batch"], seed,
                                  tsv=tsv, progress=bar.update, device=dev)

    radius = np.array([r["radius"] for r in rows])
    correct = np.array([r["correct"] for r in rows])
    radii = report.default_radii(m["sigma"])
    accs = report.certified_accuracy(radius, correct, radii)
    label = m["name"]
    report.plot_curve(out / "certified_accuracy.png", {label: (radius, correct)},
                      f"{label} on {cfg['name']}, sigma={m['sigma']}, n={c['n']}, alpha={c['alpha']}")
    wall = time.time() - t0
    report.write_json(out / "summary.json", {
        "command": "certify", "config": cfg["name"], "config_source": cfg["source"],
        "method": m, "certify": {**c, "stop": stop_}, "seed": seed, "device": str(dev), "t_star": t_star,
        "images": len(indices), "abstain": int(sum(r["predict"] < 0 for r in rows)),
        "certified_accuracy": {f"{r:g}": a for r, a in zip(radii, accs)},
        "mean_seconds_per_image": float(np.mean([r["time"] for r in rows])), "wall_seconds": wall,
        "files": {"tsv": "certify.tsv", "png": "certified_accuracy.png"},
    })
    click.echo(report.format_table({label: accs}, radii))
    click.echo(f"wrote {out}/certify.tsv, certified_accuracy.png, summary.json ({wall:.1f} s)")
