"""Network calls saved by DensePure's early-stopped vote, with the certify rows it must leave unchanged.

For each K, certifies the same digits test images twice (full vote, early-stopped vote) with the
default settings (sigma 0.5, 10 Euler steps, N0=32, N=400, alpha=0.001, batch 250, seed 0) and
counts score-network and classifier evaluations (rows fed to each network). Prints one JSON
object, then a markdown table.

    python benchmarks/early_stop.py [--votes 10,40 --skip 4 --stop 359 --n0 32 --n 400 --repeats 1]

Seconds are wall time in this process (min over --repeats alternating runs).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _common import Counter, add_certify_arguments, certify_settings
from sdepure import experiments
from sdepure.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    add_certify_arguments(ap)
    ap.add_argument("--votes", default="10,40")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--repeats", type=int, default=1, help="time each mode this often (alternating), keep the min")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)

    def settings(votes, early_stop):
        return certify_settings(cfg, args, votes=votes, steps=args.steps, solver=args.solver, early_stop=early_stop)
    components = experiments.load_components(cfg, settings(1, True).purifier, "cpu")
    net_count, cls_count = Counter(components.model.net), Counter(components.classifier)
    results = []
    for votes in [int(v) for v in args.votes.split(",")]:
        entry = {"votes": votes}
        rows = {}
        for repeat in range(args.repeats):  # alternate the two, keep the fastest of each
            for early_stop in (False, True):
                start = time.perf_counter()
                summary = experiments.certify(cfg, settings(votes, early_stop), "cpu", components=components)
                out, t_star = summary["rows"], summary["t_star"]
                indices = [r["idx"] for r in out]
                seconds = time.perf_counter() - start
                (net_rows, net_calls), (cls_rows, _) = net_count.take(), cls_count.take()
                key = "early" if early_stop else "full"
                if repeat:
                    entry[key]["seconds"] = min(entry[key]["seconds"], seconds)
                    entry[key]["seconds_per_image"] = entry[key]["seconds"] / len(indices)
                    continue
                rows[early_stop] = out
                draws = len(indices) * (args.n0 + args.n)
                entry[key] = {"network_rows": net_rows, "network_calls": net_calls, "classifier_rows": cls_rows,
                              "runs_per_draw": cls_rows / draws, "seconds": seconds,
                              "seconds_per_image": seconds / len(indices)}
        strip = [[{k: v for k, v in r.items() if k != "time"} for r in rows[e]] for e in (False, True)]
        entry["differing_rows"] = [a["idx"] for a, b in zip(*strip) if a != b]
        entry["tsv_identical"] = strip[0] == strip[1]
        entry["network_call_saving"] = entry["full"]["network_rows"] / entry["early"]["network_rows"]
        entry["time_saving"] = entry["full"]["seconds"] / entry["early"]["seconds"]
        entry["certified_accuracy_r0"] = sum(r["correct"] for r in rows[True]) / len(indices)
        results.append(entry)

    print(json.dumps({"benchmark": "early_stop", "images": len(indices), "settings": vars(args),
                      "t_star": t_star, "torch_threads": torch.get_num_threads(), "results": results}, indent=1))
    print()
    print("| K | network rows, full vote | early stop | fewer network calls | runs per draw | "
          "s / image full | early | certify.tsv identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for e in results:
        print(f"| {e['votes']} | {e['full']['network_rows']:,} | {e['early']['network_rows']:,} | "
              f"{e['network_call_saving']:.2f}x | {e['early']['runs_per_draw']:.2f} of {e['votes']} | "
              f"{e['full']['seconds_per_image']:.2f} | {e['early']['seconds_per_image']:.2f} | "
              f"{'yes' if e['tsv_identical'] else 'NO: ' + str(e['differing_rows'])} |")


if __name__ == "__main__":
    main()
