"""The cost-accuracy frontier of certification on the digits default (sigma 0.5): certified
accuracy at r = 0, 0.25, 0.5, 0.75 against network calls per image and wall time, for Carlini,
DiffPure and DensePure over solvers, K, b and sampling (a grid of 16 settings, not the product).
Each setting is one `experiments.certify` run in a fresh process, one at a time (torch's default
threads, as `sdepure certify` runs), kept in DIR/runs/ as it finishes (a second call with the same
DIR skips it). Writes frontier.json, frontier.md and frontier.png (accuracy at --radius against
network calls per image and against wall seconds per image, each with its Pareto front joined)
under --out.

    python benchmarks/frontier.py --out DIR [--skip 2 --n0 32 --n 400 --radius 0.25]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

RADII = (0.0, 0.25, 0.5, 0.75)
# (label, method overrides): Carlini, DiffPure and DensePure over solver, b, K and sampling
GRID = [
    ("carlini", {"name": "carlini"}),
    ("carlini, iss", {"name": "carlini", "sampling": "iss"}),
    ("diffpure ddpm b=5", {"name": "diffpure", "solver": "ddpm", "steps": 5}),
    ("diffpure ddim b=5", {"name": "diffpure", "solver": "ddim", "steps": 5}),
    ("diffpure euler b=10", {"name": "diffpure", "solver": "euler", "steps": 10}),
    ("densepure K=10 ddpm b=2", {"votes": 10, "solver": "ddpm", "steps": 2}),
    ("densepure K=10 ddpm b=5 (default)", {"votes": 10, "solver": "ddpm", "steps": 5}),
    ("densepure K=10 ddpm b=10", {"votes": 10, "solver": "ddpm", "steps": 10}),
    ("densepure K=40 ddpm b=5", {"votes": 40, "solver": "ddpm", "steps": 5}),
    ("densepure K=10 euler b=10", {"votes": 10, "solver": "euler", "steps": 10}),
    ("densepure K=10 ddim b=2", {"votes": 10, "solver": "ddim", "steps": 2}),
    ("densepure K=10 ddim b=5", {"votes": 10, "solver": "ddim", "steps": 5}),
    ("densepure K=10 dpm-solver-2m b=5", {"votes": 10, "solver": "dpm-solver-2m", "steps": 5}),
    ("densepure K=10 ddpm b=5, iss", {"votes": 10, "solver": "ddpm", "steps": 5, "sampling": "iss"}),
    ("densepure K=10 ddim b=5, iss", {"votes": 10, "solver": "ddim", "steps": 5, "sampling": "iss"}),
    ("densepure K=40 ddpm b=5, iss", {"votes": 40, "solver": "ddpm", "steps": 5, "sampling": "iss"}),
]


def run_one(spec: dict) -> dict:
    """One setting (runs in the child process)."""
    from sdepure import experiments
    from sdepure.config import load_config
    from sdepure.settings import certify_from_config

    cfg = load_config("digits")
    over = {"name": "densepure", "sigma": 0.5, "skip": spec["skip"], "n0": spec["n0"], "n": spec["n"], **spec["over"]}
    settings = certify_from_config(cfg, over)
    s = experiments.certify(cfg, settings, "cpu")
    return {"certified_accuracy": {k: v for k, v in s["certified_accuracy"].items() if float(k) in RADII},
            "network_calls_per_image": s["mean_network_calls_per_image"], "draws_per_image": s["mean_draws_per_image"],
            "images": s["images"], "wall_seconds": s["wall_seconds"]}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats: fewer or equal calls and higher accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -1.0
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(rows: list[dict], radius: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"{radius:g}"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120, sharey=True)
    costs = [("score-network calls per image (log)", lambda r: max(r["network_calls_per_image"], 1.0)),
             ("wall seconds per image, 2 CPU cores (log)", lambda r: r["wall_seconds"] / r["images"])]
    for ax, (xlabel, cost) in zip(axes, costs):
        pts = [(cost(r), r["certified_accuracy"][key]) for r in rows]
        for r, (x, y) in zip(rows, pts):
            color = {"carlini": "tab:green", "diffpure": "tab:orange"}.get(r["label"].split()[0].rstrip(","),
                                                                           "tab:blue")
            ax.scatter(x, y, color=color, marker="s" if "iss" in r["label"] else "o", zorder=3)
            ax.annotate(r["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        fx, fy = zip(*sorted(pts[i] for i in pareto(pts)))
        ax.step(fx, fy, where="post", color="black", linewidth=0.8, zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel(f"certified accuracy at r = {radius:g}")
    fig.suptitle("digits, sigma 0.5: carlini (green), diffpure (orange), densepure (blue); squares: iss",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| setting | r = 0 | 0.25 | 0.5 | 0.75 | network calls / image | draws / image | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = " | ".join(f"{r['certified_accuracy'][f'{x:g}']:.3f}" for x in RADII)
        lines.append(f"| {r['label']} | {acc} | {r['network_calls_per_image']:,.0f} | {r['draws_per_image']:,.0f} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--n0", type=int, default=32)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--radius", type=float, default=0.25, help="the radius the PNG plots")
    ap.add_argument("--only", help="semicolon-separated labels to run (default: the whole grid)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.out is None:
        ap.error("--out is required")
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    grid = [g for g in GRID if args.only is None or g[0] in args.only.split(";")]
    rows = []
    for label, over in grid:
        spec = {"skip": args.skip, "n0": args.n0, "n": args.n, "over": over}
        done = args.out / "runs" / (re.sub(r"[^A-Za-z0-9=.-]+", "_", label) + f"-skip{args.skip}-n{args.n}.json")
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        start = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"label": label, "settings": over, **result, "process_seconds": time.time() - start})
        done.write_text(json.dumps(rows[-1]) + "\n")
        print(f"{label}: {rows[-1]['process_seconds']:.0f} s", file=sys.stderr)
    result = {"benchmark": "frontier", "skip": args.skip, "n0": args.n0, "n": args.n, "rows": rows,
              "pareto_at_radius": {"radius": args.radius, "labels": [rows[i]["label"] for i in pareto(
                  [(r["network_calls_per_image"], r["certified_accuracy"][f"{args.radius:g}"]) for r in rows])]}}
    (args.out / "frontier.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "frontier.md").write_text(table(rows) + "\n")
    plot(rows, args.radius, args.out / "frontier.png")
    print(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
