"""Certified accuracy against the number of reverse steps b, per solver, on the digits default.

DensePure at sigma 0.5 with the default's K=10 votes, N0=32, N=400, alpha=0.001, batch 250 and
seed 0 (votes stop early when decided: same certificates, fewer network calls; a noise-free
solver votes with one run), for each solver and b. Reports certified accuracy at the default
radii, network rows per image (score-network evaluations, summed over batch rows), classifier
rows per image and seconds per image. Prints one JSON object, then a markdown table.

    python benchmarks/steps.py [--solvers euler,ddpm,ddim,dpm-solver-2m --steps 1,2,5,10,50
                                --skip 4 --n0 32 --n 400 --votes 10]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _common import Counter, add_certify_arguments, certify_settings
from sdepure import experiments, report
from sdepure.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    add_certify_arguments(ap)
    ap.add_argument("--solvers", default="euler,ddpm,ddim,dpm-solver-2m")
    ap.add_argument("--steps", default="1,2,5,10,50")
    ap.add_argument("--votes", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)

    def settings(solver, steps):
        return certify_settings(cfg, args, votes=args.votes, steps=steps, solver=solver)
    components = experiments.load_components(cfg, settings("euler", 1).purifier, "cpu")
    net_count, cls_count = Counter(components.model.net), Counter(components.classifier)
    radii = report.default_radii(args.sigma)
    results = []
    for solver in args.solvers.split(","):
        for steps in [int(b) for b in args.steps.split(",")]:
            start = time.perf_counter()
            summary = experiments.certify(cfg, settings(solver, steps), "cpu", components=components)
            seconds = time.perf_counter() - start
            images, t_star = summary["images"], summary["t_star"]
            results.append({"solver": solver, "steps": steps,
                            "certified_accuracy": summary["certified_accuracy"],
                            "network_rows_per_image": net_count.take()[0] / images,
                            "classifier_rows_per_image": cls_count.take()[0] / images,
                            "seconds_per_image": seconds / images})
            print(json.dumps(results[-1]), flush=True, file=__import__("sys").stderr)

    print(json.dumps({"benchmark": "steps", "images": images, "settings": vars(args), "t_star": t_star,
                      "torch_threads": torch.get_num_threads(), "results": results}, indent=1))
    print()
    shown = [r for r in radii if r <= 1.0]
    print("| solver | b | " + " | ".join(f"r = {r:g}" for r in shown) + " | network rows / image | s / image |")
    print("| --- | --- | " + " | ".join("---" for _ in shown) + " | --- | --- |")
    for e in results:
        accs = " | ".join(f"{e['certified_accuracy'][f'{r:g}']:.3f}" for r in shown)
        print(f"| {e['solver']} | {e['steps']} | {accs} | {e['network_rows_per_image']:,.0f} | "
              f"{e['seconds_per_image']:.2f} |")


if __name__ == "__main__":
    main()
