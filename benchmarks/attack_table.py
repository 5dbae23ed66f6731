"""The attack table on the digits default (README "Attack results"): DiffPure and DensePure under
AutoAttack rand, PGD-EOT, DiffAttack and DiffAttack with fixed randomness, one library call
(sdepure.experiments.attack) per row, each in a fresh process so that its peak memory is its own,
at most --jobs at once, one torch thread each. Every attack gets the same gradient budget:
--iters iterations x --eot draws per round (AutoAttack rand and DiffAttack: two rounds, CE then
DLR; PGD-EOT: 2 x --iters steps of one loss; fixed randomness: one draw per iteration).
Prints one JSON object and writes it, and the markdown table, under --out.

    python benchmarks/attack_table.py --out /tmp/attacks [--n-examples 16 --iters 50 --eot 10 --jobs 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ATTACKS = {
    "autoattack": lambda a: ("autoattack", {"version": "rand", "pgd_steps": a.iters, "eot": a.eot}),
    "pgd": lambda a: ("pgd", {"pgd_steps": 2 * a.iters, "eot": a.eot, "step_size": a.step_size}),
    "diffattack": lambda a: ("diffattack", {"pgd_steps": a.iters, "eot": a.eot, "dev_weight": a.dev_weight}),
    "apgd-eot": lambda a: ("diffattack", {"pgd_steps": a.iters, "eot": a.eot, "dev_weight": 0.0}),
    "fixed": lambda a: ("diffattack", {"pgd_steps": a.iters, "fixed_randomness": True, "dev_weight": a.dev_weight}),
}


def run_one(spec: dict) -> dict:
    """One attack through the library (runs in the child process)."""
    import torch

    from sdepure import experiments
    from sdepure.config import load_config
    from sdepure.settings import attack_from_config
    torch.set_num_threads(1)
    cfg = load_config(spec["config"])
    settings = attack_from_config(cfg, spec["kind"], spec["overrides"])
    summary = experiments.attack(cfg, settings, "cpu", Path(spec["out"]))
    return {"name": spec["name"], "method": spec["method"], "table": summary["table"],
            "settings": summary["settings"], "wall_seconds": summary["wall_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="new directory for the per-run files and the table")
    ap.add_argument("--config", default="digits")
    ap.add_argument("--methods", default="diffpure,densepure")
    ap.add_argument("--votes", type=int, default=4, help="DensePure's K")
    ap.add_argument("--attacks", default="autoattack,pgd,diffattack,fixed")
    ap.add_argument("--n-examples", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--eot", type=int, default=10)
    ap.add_argument("--step-size", type=float, default=0.007)
    ap.add_argument("--dev-weight", type=float, default=1.0)
    ap.add_argument("--score-draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: a JSON spec
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=False)
    specs = []
    for method in args.methods.split(","):
        for name in args.attacks.split(","):
            kind, over = ATTACKS[name](args)
            over.update(method=method, votes=args.votes if method == "densepure" else None,
                        n_examples=args.n_examples, batch=args.n_examples, score_draws=args.score_draws,
                        seed=args.seed)
            specs.append({"config": args.config, "kind": kind, "overrides": over, "name": name, "method": method,
                          "out": str(args.out / f"{method}-{name}")})

    def child(spec: dict) -> dict:
        start = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"name": spec["name"], "method": spec["method"], "error": proc.stderr.strip().splitlines()[-1:]}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.time() - start
        print(f"done {spec['method']} {spec['name']} in {result['process_seconds']:.0f} s", file=sys.stderr)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(child, specs))
    from sdepure.experiments import table_markdown
    rows = []
    for r in results:
        for row in r.get("table", []):
            label = "DiffAttack, fixed randomness" if r["name"] == "fixed" else (
                "APGD-EOT (DiffAttack, lambda 0)" if r["name"] == "apgd-eot" else row["attack"])
            rows.append({**row, "attack": f"{r['method']}: {label}"})
    report = {"benchmark": "attack_table", "settings": {k: v for k, v in vars(args).items() if k != "one"}
              | {"out": str(args.out)}, "rows": rows, "runs": results}
    (args.out / "attack_table.json").write_text(json.dumps(report, indent=1))
    (args.out / "attack_table.md").write_text(table_markdown(rows) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
