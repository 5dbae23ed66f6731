"""Parameter counts at the published flags and the time to load a full-size checkpoint (random
weights saved in the published layout) through sdepure's loaders. Prints one JSON object.

    python benchmarks/load_times.py [--tmp /tmp] [--skip guided-256-uncond]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from sdepure.classifiers.wideresnet import WideResNet, load_wideresnet
from sdepure.models.adm import ADMUNet, adm_config, load_adm
from sdepure.models.ncsnpp import NCSNpp, load_score_sde, ncsnpp_config


def count(make) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


def timed_load(save, load, path) -> dict:
    save(path)
    size = os.path.getsize(path)
    start = time.time()
    net = load(path)
    seconds = time.time() - start
    del net
    os.remove(path)
    return {"file_mb": round(size / 2 ** 20, 1), "load_seconds": round(seconds, 2)}


def score_sde_ckpt(net):
    return {"model": {"module." + k: v for k, v in net.state_dict().items()},
            "ema": {"decay": 0.9999, "num_updates": 1,
                    "shadow_params": [p.detach().clone() for p in net.parameters() if p.requires_grad]},
            "optimizer": {}, "step": 1}


FAMILIES = {
    "guided-256-uncond": (lambda: ADMUNet(**adm_config("guided-256-uncond")),
                          lambda net, p: torch.save(net.state_dict(), p),
                          lambda p: load_adm(p, "guided-256-uncond")),
    "improved-cifar10-uncond": (lambda: ADMUNet(**adm_config("improved-cifar10-uncond")),
                                lambda net, p: torch.save(net.state_dict(), p),
                                lambda p: load_adm(p, "improved-cifar10-uncond")),
    "ddpmpp-deep-continuous": (lambda: NCSNpp(**ncsnpp_config("ddpmpp-deep-continuous")),
                               lambda net, p: torch.save(score_sde_ckpt(net), p),
                               lambda p: load_score_sde(p, "ddpmpp-deep-continuous")),
    "ddpmpp-continuous": (lambda: NCSNpp(**ncsnpp_config("ddpmpp-continuous")),
                          lambda net, p: torch.save(score_sde_ckpt(net), p),
                          lambda p: load_score_sde(p, "ddpmpp-continuous")),
    "wideresnet-28-10": (lambda: WideResNet(28, 10),
                         lambda net, p: torch.save({"state_dict": net.state_dict()}, p),
                         lambda p: load_wideresnet(p)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--skip", default="", help="comma-separated names not to time")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out = {}
    for name, (make, save, load) in FAMILIES.items():
        row = {"parameters": count(make)}
        if name not in skip:
            net = make()
            row.update(timed_load(lambda p: save(net, p), load, os.path.join(args.tmp, f"sdepure-bench-{name}.pt")))
            del net
        out[name] = row
    print(json.dumps({"benchmark": "load_times", "torch_threads": torch.get_num_threads(), "families": out}, indent=1))


if __name__ == "__main__":
    main()
