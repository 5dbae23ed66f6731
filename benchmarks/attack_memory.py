"""Peak memory and seconds of one attack gradient through DiffPure at paper scale: 100 Euler steps
of the reverse VP-SDE from t* = 0.1 on a CIFAR-10-sized score network with random weights
(score_sde's DDPM++ deep, DiffPure's CIFAR-10 network, and a smaller member of the same family),
batch 1, 4 and 16, for --grad exact with the plain autograd graph, --grad exact recomputed and
--grad adjoint. One gradient is one EOT draw: d CE / d x through one purification and a small
random classifier (an EOT step of --eot E draws costs E of these, or one of E x the batch with
--eot-batch E).

Each configuration runs in a fresh process (peak resident memory only grows), one torch thread
unless --threads. Where the plain graph would not fit in --memory-gib, it is not run: the row
gives the library's own estimate of its size (solvers.graph_bytes of one network call x calls +
the solver's states, what Defense uses to choose recomputation). A configuration still running
after --timeout seconds is stopped and reported as such. Prints one JSON object and a markdown
table; with --out, writes both there, each configuration as it finishes (a second call with the
same --out skips finished ones).

    python benchmarks/attack_memory.py [--nets deep,small --batches 1,4,16 --grads plain,recomputed,adjoint]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

NETS = {"deep": ("ddpmpp-deep-continuous", {}),  # DiffPure's CIFAR-10 score network (106.6M parameters)
        "small": ("ddpmpp-continuous", {"nf": 32, "num_res_blocks": 2})}  # the same family, 2.5M
GRADS = {"plain": ("exact", float("inf")), "recomputed": ("exact", 0), "adjoint": ("adjoint", None)}
STEPS, T_STAR = 100, 0.1


def build(net: str, grad: str, threads: int):
    import torch
    from torch import nn

    from sdepure import attacks
    from sdepure.defense import Defense
    from sdepure.models.base import EpsNetModel
    from sdepure.models.ncsnpp import NCSNpp, ncsnpp_config
    from sdepure.schedules import LinearVP
    from sdepure.settings import Purifier

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset, over = NETS[net]
    model = EpsNetModel(NCSNpp(**{**ncsnpp_config(preset), **over}), LinearVP(0.1, 20.0), time_input="999t").eval()
    classifier = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.SiLU(), nn.Flatten(), nn.LazyLinear(10)).eval()
    classifier(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    mode, budget = GRADS[grad]
    defense = Defense(Purifier("diffpure", t_star=T_STAR, steps=STEPS, solver="euler", grad=mode), model, classifier, 10)
    if budget is not None:
        defense.graph_budget = budget  # inf: always the plain graph; 0: always recompute
    return attacks.AttackedModel(defense, 0), model


def plain_graph_estimate(model, batch: int) -> int:
    """Bytes of the plain graph of one solve, as the library estimates it (solvers.graph_bytes)."""
    import torch

    from sdepure.solvers import graph_bytes

    x = torch.randn(batch, 3, 32, 32)
    with torch.enable_grad():
        per_call = graph_bytes(model.score, x.requires_grad_(True), T_STAR)
    return int(per_call * STEPS + x.numel() * x.element_size() * (STEPS + 1))


def one(spec: dict) -> dict:
    """One configuration (runs in the child process)."""
    import torch

    from sdepure import attacks

    target, model = build(spec["net"], spec["grad"], spec["threads"])
    b = spec["batch"]
    out = {"parameters": sum(p.numel() for p in model.parameters())}
    if spec["grad"] == "plain":
        est = plain_graph_estimate(model, b)
        out["plain_graph_estimate_gib"] = est / 2 ** 30
        if est > spec["memory_gib"] * 2 ** 30:
            out["skipped"] = f"the plain graph (estimated {est / 2 ** 30:.1f} GiB) exceeds {spec['memory_gib']} GiB"
            return out
    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(b) % 10
    start = time.perf_counter()
    g = attacks.input_gradient(target, x, y, seed=2)
    out["seconds"] = time.perf_counter() - start
    with torch.enable_grad():
        out["solver_grad"] = target.defense.solver_grad(target.defense.x_t_star(x).requires_grad_(True)) or "plain graph"
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["gradient_norm"] = float(g.norm())
    return out


def table(rows: list[dict]) -> str:
    lines = ["| network | batch | gradient | seconds | peak resident MiB | note |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        note = r.get("skipped") or r.get("stopped") or ""
        if "plain_graph_estimate_gib" in r and not note:
            note = f"plain graph estimated {r['plain_graph_estimate_gib']:.2f} GiB"
        sec = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        mem = f"{r['peak_rss_mib']:,.0f}" if "peak_rss_mib" in r else "-"
        lines.append(f"| {r['net']} | {r['batch']} | {r['grad']} | {sec} | {mem} | {note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="small,deep")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--grads", default="plain,recomputed,adjoint")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-gib", type=float, default=20.0, help="run the plain graph only if estimated below this")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.out:
        (args.out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for net in args.nets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for grad in args.grads.split(","):
                spec = {"net": net, "batch": batch, "grad": grad, "threads": args.threads,
                        "memory_gib": args.memory_gib}
                done = args.out / "runs" / f"{net}-{batch}-{grad}.json" if args.out else None
                if done is not None and done.exists():
                    rows.append(json.loads(done.read_text()))
                    continue
                try:
                    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                          text=True, timeout=args.timeout)
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stderr[-2000:])
                    row = {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}
                except subprocess.TimeoutExpired:
                    row = {**spec, "stopped": f"not finished within {args.timeout:.0f} s"}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if done is not None:
                    done.write_text(json.dumps(row) + "\n")
    result = {"benchmark": "attack_memory", "steps": STEPS, "t_star": T_STAR, "rows": rows}
    print(json.dumps(result, indent=1))
    print(table(rows))
    if args.out:
        (args.out / "attack_memory.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "attack_memory.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
