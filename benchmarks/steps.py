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

import numpy as np
import torch

from sdepure import purify, report
from sdepure.classifiers import build_classifier
from sdepure.config import load_config
from sdepure.data import load_dataset
from sdepure.models import build_score_model
from sdepure.smoothing import Smooth, certify_images


class Counter:
    def __init__(self, module):
        self.rows = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += args[0].shape[0]

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="digits")
    ap.add_argument("--solvers", default="euler,ddpm,ddim,dpm-solver-2m")
    ap.add_argument("--steps", default="1,2,5,10,50")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--votes", type=int, default=10)
    ap.add_argument("--n0", type=int, default=32)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--skip", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    model = build_score_model(cfg["model"])
    classifier = build_classifier(cfg["classifier"], False, None)
    x, y, num_classes = load_dataset(cfg["data"])
    stop = len(x) if args.stop is None else min(args.stop, len(x))
    indices = list(range(args.start, stop, args.skip))
    net_count, cls_count = Counter(model.net), Counter(classifier)
    t_star = purify.t_star_for(model.schedule, args.sigma, "densepure")
    radii = report.default_radii(args.sigma)
    results = []
    for solver in args.solvers.split(","):
        for steps in [int(b) for b in args.steps.split(",")]:
            base = purify.PurifiedClassifier(purify.ReverseProcess(model, t_star, steps, solver), classifier,
                                             num_classes, args.votes)
            smooth = Smooth(base.predict, num_classes, args.sigma)
            start = time.perf_counter()
            with torch.no_grad():
                rows = certify_images(smooth, x, y, indices, args.n0, args.n, args.alpha, args.batch, args.seed)
            seconds = time.perf_counter() - start
            radius = np.array([r["radius"] for r in rows])
            correct = np.array([r["correct"] for r in rows])
            accs = report.certified_accuracy(radius, correct, radii)
            results.append({"solver": solver, "steps": steps,
                            "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, accs)},
                            "network_rows_per_image": net_count.take() / len(indices),
                            "classifier_rows_per_image": cls_count.take() / len(indices),
                            "seconds_per_image": seconds / len(indices)})
            print(json.dumps(results[-1]), flush=True, file=__import__("sys").stderr)

    print(json.dumps({"benchmark": "steps", "images": len(indices), "settings": vars(args), "t_star": t_star,
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
