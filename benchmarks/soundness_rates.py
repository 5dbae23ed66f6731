"""Measured failure rates of sdepure's CERTIFY and PREDICT on a base classifier with exact
answers (the linear classifier of tests/test_soundness.py, at more inputs and several alpha).

f(x) = 1[w.x > b]: the smoothed classifier's decision boundary is the same hyperplane and its
true robust radius at x is the distance |m| to it. A certificate over-claims when it names the
wrong class or a radius above |m|; Cohen et al. bound that probability by alpha per input.
CERTIFY is audited on margins uniform in [-3 sigma, 3 sigma], PREDICT on margins within
0.2 sigma of the boundary. Prints one JSON object; rates carry a 95% Clopper-Pearson interval.

    python benchmarks/soundness_rates.py [--inputs 20000] [--alpha 0.05,0.01,0.001] [--n0 64] [--n 400]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from scipy.stats import beta as beta_dist

from sdepure.rng import derive_seed, generator
from sdepure.smoothing import ABSTAIN, Smooth

D, SIGMA = 4, 0.5


def linear_problem(count: int, spread: float, seed: int):
    g = generator(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    b = 0.3
    unit = w / w.norm()
    margins = (torch.rand(count, generator=g, dtype=torch.float64) * 2 - 1) * spread * SIGMA
    along = torch.randn(count, D, generator=g, dtype=torch.float64)
    along -= (along @ unit)[:, None] * unit
    return w, b, along + (b / w.norm() + margins)[:, None] * unit, margins


def interval(k: int, n: int) -> list[float]:
    lo = 0.0 if k == 0 else float(beta_dist.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta_dist.ppf(0.975, k + 1, n - k))
    return [round(lo, 5), round(hi, 5)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=20000)
    ap.add_argument("--alpha", default="0.05,0.01,0.001")
    ap.add_argument("--n0", type=int, default=64)
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for alpha in (float(a) for a in args.alpha.split(",")):
        start = time.time()
        w, b, x, m = linear_problem(args.inputs, 3.0, seed=0)
        smooth = Smooth(lambda z, seed: (z.reshape(z.shape[0], -1) @ w > b).long(), 2, SIGMA)
        over = abstain = 0
        for i in range(args.inputs):
            pred, radius, _ = smooth.certify(x[i], args.n0, args.n, alpha, args.n, seed=derive_seed(11, i))
            abstain += pred == ABSTAIN
            over += pred != ABSTAIN and (pred != int(m[i] > 0) or radius > abs(float(m[i])))
        w, b, x, m = linear_problem(args.inputs, 0.2, seed=1)
        smooth = Smooth(lambda z, seed: (z.reshape(z.shape[0], -1) @ w > b).long(), 2, SIGMA)
        wrong = p_abstain = 0
        for i in range(args.inputs):
            p = smooth.predict(x[i], args.n, alpha, args.n, seed=derive_seed(12, i))
            p_abstain += p == ABSTAIN
            wrong += p not in (ABSTAIN, int(m[i] > 0))
        n = args.inputs
        results.append({
            "alpha": alpha,
            "certify_over_claim_rate": over / n, "certify_over_claim_ci95": interval(over, n),
            "certify_abstain_rate": abstain / n,
            "predict_wrong_rate": wrong / n, "predict_wrong_ci95": interval(wrong, n),
            "predict_abstain_rate": p_abstain / n,
            "seconds": round(time.time() - start, 1)})
    print(json.dumps({"benchmark": "soundness_rates", "inputs": args.inputs, "dimension": D, "sigma": SIGMA,
                      "n0": args.n0, "n": args.n, "results": results}, indent=1))


if __name__ == "__main__":
    main()
