"""Wall time and network calls of DensePure's early-stopped vote against the full vote, with the
certify rows it must leave unchanged.

For each torch thread count, N and K, certifies the same digits test images with the full vote and
with the early-stopped vote (alternating, --repeats times each, the fastest kept) and counts the
score network's rows and calls (one call per reverse step of a solve; the figures of the fastest
run; the early stop's include the solves that measure its cost model, and its rounds follow that
measurement, so they can differ between runs). Defaults: the issue-14
setting (sigma 1.0, 10 Euler steps, N0 = 16, N = 100 and 400, alpha 0.001, batch 250, 20 images:
every 18th of the first 360, seed 0). Each certify builds a new Defense, so the early stop's
time includes measuring its cost model once. Prints one JSON object, then a markdown table.

    python benchmarks/early_stop.py [--votes 40,10 --n 100,400 --threads 1,2 --repeats 2 --skip 18 --stop 360]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _common import Counter, add_certify_arguments, certify_settings
from sdepure import experiments
from sdepure.config import load_config


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(conflict_handler="resolve")
    add_certify_arguments(ap, skip=18)
    ap.set_defaults(sigma=1.0, n0=16, stop=360)
    ap.add_argument("--n", type=ints, default=[100, 400], help="noise draws to estimate (comma-separated)")
    ap.add_argument("--threads", type=ints, default=[1, 2], help="torch threads (comma-separated)")
    ap.add_argument("--votes", type=ints, default=[40, 10])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--repeats", type=int, default=2, help="time each vote this often (alternating), keep the min")
    args = ap.parse_args()

    cfg = load_config(args.config)

    def settings(n, votes, early_stop):
        return certify_settings(cfg, argparse.Namespace(**{**vars(args), "n": n}), votes=votes, steps=args.steps,
                                solver=args.solver, early_stop=early_stop)
    components = experiments.load_components(cfg, settings(args.n[0], 1, True).purifier, "cpu")
    net_count = Counter(components.model.net)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.n:
            for votes in args.votes:
                entry = {"threads": threads, "n": n, "votes": votes, "load_before": os.getloadavg()[0]}
                rows = {}
                for repeat in range(args.repeats):  # alternate the two, keep the fastest of each
                    for key in ("full", "early"):
                        start = time.perf_counter()
                        summary = experiments.certify(cfg, settings(n, votes, key == "early"), "cpu",
                                                      components=components)
                        seconds = time.perf_counter() - start
                        net_rows, net_calls = net_count.take()
                        out = [{k: v for k, v in r.items() if k not in ("time", "calls")} for r in summary["rows"]]
                        if repeat:  # the early stop's rounds follow its measured cost model: rows may differ
                            assert out == rows[key]
                            e = entry[key]
                            e["seconds_all"].append(round(seconds, 2))
                            e["rows_all"].append(net_rows)
                            e["calls_all"].append(net_calls)
                            if seconds < e["seconds"]:
                                e.update(seconds=seconds, network_rows=net_rows, network_calls=net_calls)
                            continue
                        rows[key] = out
                        entry[key] = {"network_rows": net_rows, "network_calls": net_calls, "seconds": seconds,
                                      "seconds_all": [round(seconds, 2)], "rows_all": [net_rows],
                                      "calls_all": [net_calls]}
                entry["load_after"] = os.getloadavg()[0]
                entry["images"] = len(rows["full"])
                entry["differing_rows"] = [a["idx"] for a, b in zip(rows["full"], rows["early"]) if a != b]
                entry["tsv_identical"] = rows["full"] == rows["early"]
                entry["network_row_saving"] = entry["full"]["network_rows"] / entry["early"]["network_rows"]
                entry["wall_gain"] = entry["full"]["seconds"] / entry["early"]["seconds"]
                results.append(entry)
                print(json.dumps(entry), flush=True)

    print(json.dumps({"benchmark": "early_stop", "settings": vars(args), "results": results}, indent=1))
    print()
    print("| threads | N | K | network rows, full | early | fewer rows | network calls, full | early | "
          "s full | s early | wall gain | certify.tsv identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for e in results:
        print(f"| {e['threads']} | {e['n']} | {e['votes']} | {e['full']['network_rows']:,} | "
              f"{e['early']['network_rows']:,} | {e['network_row_saving']:.2f}x | {e['full']['network_calls']:,} | "
              f"{e['early']['network_calls']:,} | {e['full']['seconds']:.1f} | {e['early']['seconds']:.1f} | "
              f"{e['wall_gain']:.2f}x | {'yes' if e['tsv_identical'] else 'NO: ' + str(e['differing_rows'])} |")


if __name__ == "__main__":
    main()
