"""Certified accuracy of none / carlini / diffpure / densepure on the digits default at several
sigmas (the README table). Prints one JSON object; per-run files go under --out.

    python benchmarks/digits_certify_table.py --out /tmp/table [--skip 2 --n0 100 --n 1000]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdepure import experiments
from sdepure.config import load_config
from sdepure.settings import certify_from_config

METHODS = ("none", "carlini", "diffpure", "densepure")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sigmas", default="0.25,0.5,1.0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--votes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config("digits")
    results = {}
    for sigma in args.sigmas.split(","):
        for method in args.methods.split(","):
            settings = certify_from_config(cfg, dict(
                name=method, sigma=float(sigma), votes=args.votes if method == "densepure" else None,
                steps=args.steps, solver=args.solver, n0=args.n0, n=args.n, alpha=args.alpha, batch=None,
                start=0, skip=args.skip, seed=args.seed))
            start = time.time()
            summary = experiments.certify(cfg, settings, "cpu", args.out / f"{method}-sigma{sigma}")
            results[f"{method}@{sigma}"] = {"certified_accuracy": summary["certified_accuracy"],
                                            "images": summary["images"], "seconds": time.time() - start}
    print(json.dumps({"benchmark": "digits_certify_table", "settings": vars(args) | {"out": str(args.out)},
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
