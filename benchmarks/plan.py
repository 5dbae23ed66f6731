"""How well `sdepure certify --plan` projects a run: the plan's projected wall time against the
measured run, each in a fresh process, on the digits default (or any certify flags given).
Issue 14's target: within 25% on the digits default. Prints one JSON object.

    python benchmarks/plan.py [--repeats 2] [-- extra certify flags such as --sampling iss]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def clock_seconds(text: str) -> float:
    h, m, s = (int(v) for v in re.search(r"projected wall time: (\d+):(\d\d):(\d\d)", text).groups())
    return 3600 * h + 60 * m + s


def run(args: list[str]) -> tuple[float, str]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "sdepure_cli", "certify", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.time() - start, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("flags", nargs="*", help="certify flags (after --)")
    args = ap.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            _, plan_out = run([*args.flags, "--plan"])
            seconds, _ = run([*args.flags, "--out", str(Path(tmp) / f"run{k}")])
            projected = clock_seconds(plan_out)
            pairs.append({"projected_seconds": projected, "measured_seconds": round(seconds, 1),
                          "ratio": round(projected / seconds, 3)})
            print(plan_out, file=sys.stderr)
    ok = all(abs(p["ratio"] - 1) <= 0.25 for p in pairs)
    print(json.dumps({"benchmark": "plan", "flags": args.flags, "pairs": pairs, "within_25_percent": ok}, indent=1))


if __name__ == "__main__":
    main()
