"""A decision map's cost: the smoothed DensePure classifier's PREDICT on every point of a grid
through a digits test image, batched over grid points and draws (regions.decision_map, the
notebooks' way) or one point at a time (Smooth.predict per point). Both give the same labels
(the JSON carries a checksum of them); time the two as whole processes, e.g.

    python benchmarks/decision_map.py --mode batched
    python benchmarks/decision_map.py --mode alone
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch

from sdepure import regions
from sdepure.config import load_config
from sdepure.defense import Defense
from sdepure.experiments import load_components
from sdepure.rng import derive_seed
from sdepure.settings import certify_from_config
from sdepure.smoothing import Smooth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("batched", "alone"), default="batched")
    ap.add_argument("--size", type=int, default=15, help="grid points per side")
    ap.add_argument("--n", type=int, default=100, help="PREDICT's draws per point")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1000, help="batched: rows per defense call")
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("digits")
    s = certify_from_config(cfg, {"name": "densepure"})
    parts = load_components(cfg, s.purifier, "cpu")
    defense = Defense(s.purifier, parts.model, parts.classifier, parts.num_classes)
    smooth = Smooth(defense.predict, parts.num_classes, s.sigma, rng=defense.draws)
    x = parts.x[args.image]
    u, v = regions.slice_plane(x, torch.ones_like(x), seed=1)
    start = time.perf_counter()
    if args.mode == "batched":
        labels = regions.decision_map(smooth, x, u, v, 1.0, args.size, args.n, s.alpha, args.batch, 7, args.rows)
        labels = labels.flatten().tolist()
    else:
        points, _ = regions.grid(x, u, v, 1.0, args.size)
        labels = [smooth.predict(points[i], args.n, s.alpha, args.batch, derive_seed(7, i)) for i in range(len(points))]
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "points": len(labels), "n": args.n, "seconds": round(seconds, 2),
                      "network_calls": defense.network_calls,
                      "labels_sha1": hashlib.sha1(str(labels).encode()).hexdigest()[:12]}))


if __name__ == "__main__":
    main()
