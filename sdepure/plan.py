"""What a certification run will cost, before it is spent (`sdepure certify --plan`).

Network calls per image follow from the settings: a noise draw costs K reverse runs of b steps
(calls per step by solver), fewer where the early-stopped vote ends a draw's vote sooner; a
certificate takes n0 + n draws (fixed), or between n0 and n0 + n (iss), n0 + one batch and
n0 + n (sequential). What depends on the data (the vote's early stop, iss and sequential
draw counts) and what the machine makes of it are measured: one batched forward pass of the
score network and of the classifier at the run's shape, and a few selected images certified
with the run's settings (at most PROBE_DRAWS estimation draws each; beyond, the cost per draw
is extrapolated). Nothing is written.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .data import take
from .defense import Defense
from .experiments import load_components, selected_images
from .progress import format_seconds
from .settings import Certify
from .smoothing import Smooth, certify_images, checkpoints

PROBE_IMAGES = 6
PROBE_DRAWS = 2000


def _timed(fn, device, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call (synchronised on CUDA: a one-off measurement)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_seconds(defense: Defense, x: torch.Tensor, batch: int, device) -> dict:
    """One forward pass of the score network and of the classifier at the run's row count
    (batch noise draws x K runs)."""
    rows = batch * defense.votes
    xs = x.unsqueeze(0).expand(rows, *x.shape).contiguous().to(device)
    out = {"rows": rows}
    with torch.no_grad():
        if defense.model is not None:
            t = torch.full((rows,), defense.t_star, dtype=xs.dtype, device=xs.device)
            out["score_network_seconds"] = _timed(lambda: defense.model.eps(2 * xs - 1, t), device)
        out["classifier_seconds"] = _timed(lambda: defense.classify(xs), device)
    return out


def plan(cfg: dict, settings: Certify, device, processes: int = 1, shard=None, allow_pickle: bool = False,
         probe: int = PROBE_IMAGES) -> dict:
    """The projected cost of certify(cfg, settings, device) over `processes` processes (or this
    `shard`); certifies up to `probe` selected images to measure it, writing nothing."""
    device = torch.device(device)
    t0 = time.time()
    c = load_components(cfg, settings.purifier, device, allow_pickle)
    defense = Defense(settings.purifier, c.model, c.classifier, c.num_classes)
    load_seconds = time.time() - t0
    indices = selected_images(settings, len(c.x))
    own = shard.select(indices) if shard else indices
    per_draw = defense.calls_per_draw
    n0, n = settings.n0, settings.n
    first = checkpoints(n, settings.batch)[0] if n >= settings.batch else n
    calls = {"fixed": (n0 + n) * per_draw, "iss": [n0 * per_draw, (n0 + n) * per_draw],
             "sequential": [(n0 + first) * per_draw, (n0 + n) * per_draw]}

    count = min(probe, len(own))
    picks = [own[round(j * (len(own) - 1) / max(count - 1, 1))] for j in range(count)]  # evenly spaced
    probe_settings = settings if n <= PROBE_DRAWS else dataclasses.replace(settings, n=PROBE_DRAWS)
    forward = forward_seconds(defense, take(c.x, [picks[0]])[0], settings.batch, device)
    smooth = Smooth(defense.predict, c.num_classes, settings.sigma, rng=defense.draws)
    start = time.time()
    with torch.no_grad():
        rows = certify_images(smooth, c.x, c.y, picks, n0, probe_settings.n, settings.alpha, settings.batch,
                              settings.seed, device=device, calls=lambda: defense.network_calls,
                              sampling=settings.sampling, radius_tol=settings.radius_tol, radii=settings.radii or ())
    probe_seconds = time.time() - start
    draws = sum(r["draws"] for r in rows)
    seconds_per_draw = sum(r["time"] for r in rows) / draws
    calls_per_draw = sum(r["calls"] for r in rows) / draws
    if settings.sampling == "fixed":
        draws_per_image, extrapolated = n0 + n, n > PROBE_DRAWS
    else:  # the adaptive draw count as measured, scaled to the cap where the probe was capped
        measured = draws / len(rows) - n0
        draws_per_image, extrapolated = n0 + measured * n / probe_settings.n, n > PROBE_DRAWS
    image_seconds = draws_per_image * seconds_per_draw
    images = len(own)
    return {"command": "certify --plan", "config": cfg["name"], "settings": settings.to_dict(),
            "device": str(device), "images": images, "processes": processes,
            "network_calls_per_draw": {"full vote": per_draw, "measured": calls_per_draw},
            "network_calls_per_image": calls,
            "measured_network_calls_per_image": draws_per_image * calls_per_draw,
            "forward_pass": forward,
            "probe": {"images": picks, "seconds": probe_seconds, "estimation_draws_cap": probe_settings.n,
                      "seconds_per_draw": seconds_per_draw},
            "draws_per_image": draws_per_image, "extrapolated": extrapolated,
            "seconds_per_image": image_seconds, "load_seconds": load_seconds,
            "projected_seconds": load_seconds + images * image_seconds / processes}


def describe(p: dict) -> str:
    """The plan as lines for the terminal."""
    s = p["settings"]
    calls = p["network_calls_per_image"]
    f = p["forward_pass"]
    lines = [f"plan: {p['images']} images on {p['processes']} process(es), device {p['device']}, "
             f"sampling {s['sampling']} (n0 {s['n0']}, n {s['n']}, batch {s['batch']})",
             f"  network calls per draw: {p['network_calls_per_draw']['full vote']:,} with the full vote, "
             f"{p['network_calls_per_draw']['measured']:,.0f} measured",
             f"  network calls per image at the full vote: fixed {calls['fixed']:,}; iss {calls['iss'][0]:,} to "
             f"{calls['iss'][1]:,}; sequential {calls['sequential'][0]:,} to {calls['sequential'][1]:,}",
             f"  one forward pass of {f['rows']:,} rows: "
             + (f"score network {f['score_network_seconds'] * 1e3:.1f} ms, " if "score_network_seconds" in f else "")
             + f"classifier {f['classifier_seconds'] * 1e3:.1f} ms",
             f"  probe: {len(p['probe']['images'])} images certified in {p['probe']['seconds']:.1f} s "
             f"(at most {p['probe']['estimation_draws_cap']:,} estimation draws each; nothing written): "
             f"{p['probe']['seconds_per_draw'] * 1e3:.2f} ms per draw",
             f"  per image: {p['draws_per_image']:,.0f} draws, {p['measured_network_calls_per_image']:,.0f} network "
             f"calls, {p['seconds_per_image']:.2f} s" + (" (extrapolated from the probe)" if p["extrapolated"] else ""),
             f"  projected wall time: {format_seconds(p['projected_seconds'])} ({p['load_seconds']:.1f} s loading, then "
             f"{p['images']} images / {p['processes']} process(es))"]
    return "\n".join(lines)

