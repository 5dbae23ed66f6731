"""Experiments as library calls: certify a dataset, attack a purified classifier.

Each takes a loaded config (sdepure.config), validated settings (sdepure.settings) and a device,
writes its files to `out` when given, and returns the dict written as summary.json, so the
command line, benchmarks and notebooks run the same code.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import torch
from torch import nn

from . import attacks, diffattack, distributed, report, runs
from .classifiers import build_classifier
from .data import load_dataset, take
from .defense import Defense
from .errors import SdepureError
from .models import build_score_model
from .models.base import DiffusionModel
from .progress import Progress, format_seconds
from .rng import AttackPhase, derive_seed
from .settings import Attack, Certify, Purifier
from .smoothing import Smooth, certify_images

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Components:
    """What a run needs besides its settings: data, the diffusion model, the classifier."""
    x: object  # tensor or lazily read images, indexable by image index
    y: torch.Tensor
    num_classes: int
    model: DiffusionModel | None
    classifier: nn.Module


def load_components(cfg: dict, purifier: Purifier, device, allow_pickle: bool = False) -> Components:
    x, y, num_classes = load_dataset(cfg["data"])
    model = build_score_model(cfg["model"], allow_pickle).to(device) if purifier.method != "none" else None
    classifier = build_classifier(cfg["classifier"], allow_pickle, num_classes).to(device)
    return Components(x, y, num_classes, model, classifier)


def selected_images(settings: Certify, total: int) -> list[int]:
    stop = total if settings.stop is None else min(settings.stop, total)
    indices = list(range(settings.start, stop, settings.skip))
    if not indices:
        raise SdepureError(f"no images selected: start={settings.start} stop={stop} skip={settings.skip} "
                           f"of {total} images")
    return indices


def certify(cfg: dict, settings: Certify, device, out: Path | None = None, allow_pickle: bool = False,
            components: Components | None = None, echo: Echo = _quiet,
            progress: Callable[[int], None] | None = None, log: TextIO | None = None,
            resume: bool = False, shard: runs.Shard | None = None,
            dist: distributed.DistEnv | None = None) -> dict:
    """Cohen's CERTIFY on each selected image, or on `shard` of them.

    With `out`, a run directory (sdepure.runs): run.json first, rows appended to certify.tsv as
    they are known, summary.json and certified_accuracy.png at the end. `out` must not exist,
    unless `resume`: then the run in `out` continues (same settings, or an error naming the one
    that differs; a torn last row is redone). Under torchrun (`dist`, several processes) process
    RANK certifies shard RANK/WORLD_SIZE into out/shard-RANK-of-WORLD_SIZE/ and rank 0 merges the
    shards at the end. `log`: a stream for progress (sdepure.progress: a bar on a terminal,
    otherwise lines); `progress`: called with the number of draws of each batch.
    Returns the summary with the rows under "rows" (under torchrun: all rows on rank 0, the
    rank's own shard elsewhere)."""
    t0 = time.time()
    dist = dist or distributed.DistEnv()
    if dist.active and shard is not None:
        raise SdepureError("--shard and torchrun both split the images; use one of them")
    if (dist.active or resume) and out is None:
        raise SdepureError("resuming or running under torchrun needs the run directory")
    device = torch.device(device)
    c = components or load_components(cfg, settings.purifier, device, allow_pickle)
    indices = selected_images(settings, len(c.x))
    defense = Defense(settings.purifier, c.model, c.classifier, c.num_classes)
    t_star = defense.t_star
    smooth = Smooth(defense.predict, c.num_classes, settings.sigma, rng=defense.draws)
    own_shard = runs.Shard(dist.rank, dist.world_size) if dist.active else shard
    own = own_shard.select(indices) if own_shard else indices
    say = echo if dist.is_main else _quiet
    say(f"sdepure certify: {settings.purifier.describe()} on {cfg['name']} ({len(indices)} images "
        f"from {indices[0]} by {settings.skip} of {len(c.x)}"
        + (f"; shard {shard}: {len(own)} images" if shard else "")
        + (f"; {dist.world_size} processes" if dist.active else "") + ")"
        + (f", t*={t_star:.4f}" if t_star is not None else "")
        + (f", {defense.resolved['variance']} ddpm variance" if defense.resolved.get("variance") else ""))
    say(f"  n0={settings.n0} n={settings.n} alpha={settings.alpha} batch={settings.batch} seed={settings.seed} "
        f"device={device}" + (f" out={out}" if out is not None else "") + sampling_note(settings))

    run_dir, done = None, []
    try:
        if out is not None:
            info = {"device": str(device), "t_star": t_star, "resolved": defense.resolved}

            def record_for(part, world_size):
                return runs.make_record(settings.to_dict(), cfg, part.select(indices) if part else indices, part,
                                        world_size, **info)
            out, run_dir, done = _open_run(Path(out), record_for, runs.resume, shard, dist, resume)
        todo = runs.pending({"images": own}, done)
        if resume and done:
            say(f"resuming {out}: {len(done)} of {len(own)} images done, {len(todo)} to go")
        if resume and not todo:
            echo(f"{dist.prefix}run {run_dir} was already complete ({len(own)} images); "
                 f"its summary is written again")
        bar = Progress(len(own), settings.n0 + settings.n, len(done), log, prefix=dist.prefix) if log else None

        def draws(m: int) -> None:
            if progress:
                progress(m)
            if bar:
                bar.draws(m)

        args = (smooth, c.x, c.y, todo, settings.n0, settings.n, settings.alpha, settings.batch, settings.seed)
        kwargs = dict(on_row=bar.image if bar else None, calls=lambda: defense.network_calls,
                      sampling=settings.sampling, radius_tol=settings.radius_tol, radii=settings.radii or ())
        try:
            if run_dir is not None:
                cost = runs.has_cost_columns(run_dir / runs.TSV_FILE)  # a run from before keeps its columns
                with open(run_dir / runs.TSV_FILE, "a") as tsv, torch.no_grad():
                    certify_images(*args, tsv=tsv, progress=draws, device=device, cost=cost, **kwargs)
                rows = runs.load_rows(run_dir)
            else:
                with torch.no_grad():
                    rows = certify_images(*args, progress=draws, device=device, **kwargs)
        finally:
            if bar:
                bar.close()
        if dist.active:
            distributed.barrier(dist)  # every shard is finished
            if dist.is_main:
                _, rows = runs.collect([out])
    finally:
        distributed.shutdown(dist)
    summary = certify_summary(cfg, settings, rows, t_star, str(device))
    summary["resolved"] = defense.resolved
    summary["shard"] = str(shard) if shard else None
    summary["processes"] = dist.world_size
    summary["wall_seconds"] = time.time() - t0
    if out is not None and dist.is_main:
        if dist.active:
            runs.write_rows(out / runs.TSV_FILE, rows)  # the shards' rows, merged and sorted by idx
        write_certify_files(out, summary, rows)
    return {**summary, "rows": rows, "run_dir": None if out is None else str(out)}


def merge(dirs, out: Path) -> dict:
    """Combine the finished shards of one run (checked by sdepure.runs.collect) into the new run
    directory `out`: run.json, certify.tsv sorted by idx, summary.json, certified_accuracy.png.
    Returns the summary with the rows under "rows"."""
    t0 = time.time()
    out = Path(out)
    report.check_out(out)
    record, rows = runs.collect(dirs)
    if record["format"] == runs.ATTACK_FORMAT:
        runs.start(out, record)
        return _write_merged_attack(runs.expand(dirs), out, record, rows, t0)
    s = record["settings"]
    settings = Certify.from_dict(s)
    cfg = {"name": record.get("config_name"), "source": record.get("config_source")}
    runs.start(out, record)
    runs.write_rows(out / runs.TSV_FILE, rows)
    summary = certify_summary(cfg, settings, rows, record.get("t_star"), record.get("device"))
    summary["merged_from"] = [str(d) for d in dirs]
    summary["wall_seconds"] = time.time() - t0
    write_certify_files(out, summary, rows)
    return {**summary, "rows": rows}


def _write_merged_attack(dirs: list[Path], out: Path, record: dict, rows: list[dict], t0: float) -> dict:
    """The merged attack run in `out` (its run.json written): examples.tsv sorted by example, the
    summary and table recomputed from the rows (never averaged from the shards' summaries),
    adversarial.pt when every shard kept its batches' examples. Seconds are the sum over
    batches; peak memory the shards' largest."""
    settings = Attack.from_dict(record["settings"])
    report.write_example_rows(out / report.EXAMPLES_FILE, rows, settings.fixed_randomness)
    peaks = []
    for d in dirs:
        try:
            peaks.append(json.loads((Path(d) / "summary.json").read_text())["peak_memory_mb"])
        except (OSError, ValueError, KeyError):
            pass
    summary = {"command": "attack", "attack": settings.kind, "config": record.get("config_name"),
               "settings": settings.to_dict(), "device": record.get("device"), "resolved": record.get("resolved"),
               "shard": None, **attack_summary(settings, rows, max(peaks, default=float("nan")))}
    summary["merged_from"] = [str(d) for d in dirs]
    if all(runs.load_record(d, runs.ATTACK_FORMAT).get("save_adv") for d in dirs):
        save_adversarial(out, dirs, runs.attack_batches(record), None)
    summary["wall_seconds"] = time.time() - t0
    report.write_json(out / "summary.json", summary)
    return summary


def _open_run(out: Path, record_for, reopen, shard, dist, resume: bool) -> tuple[Path, Path, list]:
    """Start or resume the run directory `out` (under torchrun: the run and this rank's shard in
    it); returns the run directory (under torchrun: rank 0's name for it), the directory this
    process writes rows to, and the rows that one already has. record_for(shard, world_size): the
    run record; reopen(run_dir, record): the rows a run directory already has, after checking it
    has exactly that record (runs.resume, runs.resume_attack).
    Every check runs on every rank before the processes meet, so all refuse together."""
    if not dist.active:
        record = record_for(shard, 1)
        if resume:
            return out, out, reopen(out, record)
        report.check_out(out)
        runs.start(out, record)
        return out, out, []
    own = runs.Shard(dist.rank, dist.world_size)
    top, mine = record_for(None, dist.world_size), record_for(own, 1)
    if resume:
        runs.check_resumable(out, runs.load_record(out, top["format"]), top)
        distributed.init(dist)
        run_dir = out / own.dirname
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # killed between creating it and writing its record
        if not run_dir.exists():  # killed before this rank began
            runs.start(run_dir, mine)
            return out, run_dir, []
        return out, run_dir, reopen(run_dir, mine)
    distributed.init(dist)
    out = Path(distributed.broadcast(dist, str(out)))  # rank 0's name (a default one has a time stamp)
    report.check_out(out)
    distributed.barrier(dist)
    if dist.is_main:
        runs.start(out, top)
    distributed.barrier(dist)
    run_dir = out / own.dirname
    runs.start(run_dir, mine)
    return out, run_dir, []


def sampling_note(settings: Certify) -> str:
    if settings.sampling == "iss":
        return f" sampling=iss (cap n, radius-tol {settings.radius_tol:g})"
    if settings.sampling == "sequential":
        return f" sampling=sequential (cap n, radii {', '.join(f'{r:g}' for r in settings.radii)})"
    return ""


def certify_summary(cfg: dict, settings: Certify, rows: list[dict], t_star: float | None, device: str) -> dict:
    """Certified accuracy at the default radii (sequential sampling: at its target radii only, the
    only ones it decides), and what the images cost: mean draws and network calls per image (over
    the rows that record them; a run from before issue 14 has none)."""
    radius = np.array([r["radius"] for r in rows])
    correct = np.array([r["correct"] for r in rows])
    radii = list(settings.radii) if settings.sampling == "sequential" else report.default_radii(settings.sigma)
    accs = report.certified_accuracy(radius, correct, radii)
    costed = [r for r in rows if "draws" in r]
    return {"command": "certify", "config": cfg["name"], "config_source": cfg["source"],
            "settings": settings.to_dict(), "device": device, "t_star": t_star, "images": len(rows),
            "abstain": int(sum(r["predict"] < 0 for r in rows)),
            "certified_accuracy": {f"{r:g}": a for r, a in zip(radii, accs)},
            "mean_seconds_per_image": float(np.mean([r["time"] for r in rows])) if rows else None,
            "mean_draws_per_image": float(np.mean([r["draws"] for r in costed])) if costed else None,
            "mean_network_calls_per_image": float(np.mean([r["calls"] for r in costed])) if costed else None,
            "files": {"tsv": "certify.tsv", "png": "certified_accuracy.png"}}


def write_certify_files(out: Path, summary: dict, rows: list[dict]) -> None:
    s = summary["settings"]
    radius = np.array([r["radius"] for r in rows])
    correct = np.array([r["correct"] for r in rows])
    method = s["purifier"]["method"]
    report.plot_curve(out / "certified_accuracy.png", {method: (radius, correct)},
                      f"{method} on {summary['config']}, sigma={s['purifier']['sigma']}, n={s['n']}, "
                      f"alpha={s['alpha']}")
    report.write_json(out / "summary.json", summary)


def certified_table(summary: dict) -> str:
    radii = [float(r) for r in summary["certified_accuracy"]]
    return report.format_table({summary["settings"]["purifier"]["method"]:
                                list(summary["certified_accuracy"].values())}, radii)


# -- attacks ------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` for the duration (None: left alone), then
    restored. Small networks gain little from threads and lose much when another job holds a
    core: the threads spin-wait for each other at every operation."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def peak_memory_mb(device) -> float:
    """Peak memory so far: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak
    resident set size (it only grows: compare attacks run in separate processes)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


ATTACK_NAMES = {"autoattack": "AutoAttack {version}", "pgd": "PGD-EOT", "bpda": "BPDA+EOT", "diffattack": "DiffAttack"}


def attack(cfg: dict, settings: Attack, device, out: Path | None = None, allow_pickle: bool = False,
           components: Components | None = None, save_adv: bool = False, echo: Echo = _quiet,
           progress: Callable[[int], None] | None = None, resume: bool = False, log: TextIO | None = None,
           shard: runs.Shard | None = None, dist: distributed.DistEnv | None = None) -> dict:
    """Run the attack on the selected examples and score the defense over `score_draws`
    purifications, on `settings.threads` torch threads. With `out`: summary.json, examples.tsv
    (and adversarial.pt with save_adv). Returns the summary; its "table" has one row per way of
    scoring the attack (see attack_table).

    With `out`, a run directory (sdepure.runs): run.json first, then each batch's rows appended
    to examples.tsv when the batch ends (and its adversarial examples kept under adv/ with
    save_adv). With `resume` the run in `out` continues: same settings or an error naming the one
    that differs; finished batches are kept, the others redone. Rows and summary equal an
    uninterrupted run's (seconds and memory aside). `log`: a stream that gets one line per
    finished batch (examples done, robust accuracy so far per scoring, seconds per example, ETA).

    With fixed_randomness the attacked defense is diffattack.FixedRandomness (each example's draws
    fixed by (seed, example index), known to the attacker): the attack, its clean and robust flags
    and the table's "fixed" row use that randomness; the "fresh" row scores the same adversarial
    examples under fresh randomness, beside it."""
    with torch_threads(settings.threads):
        return _attack(cfg, settings, device, out, allow_pickle, components, save_adv, echo, progress, resume, log,
                       shard, dist)


def batch_line(rows: list[dict], total: int, seconds: float, run_here: int) -> str:
    """The log line of a finished batch: `rows` so far, `seconds` spent on the `run_here` examples
    this process attacked."""
    per = seconds / max(run_here, 1)
    robust = {"attack": np.mean([r["robust"] for r in rows]), "single": np.mean([r["adv_draws_correct"] for r in rows]),
              "majority": np.mean([r["adv_majority_correct"] for r in rows]),
              "any-of-N": np.mean([r["adv_any_of_n_correct"] for r in rows])}
    return (f"attack: {len(rows)}/{total} examples, robust so far " + " / ".join(f"{k} {v:.3f}" for k, v in robust.items())
            + f", {per:.1f} s/example, ETA {format_seconds(per * (total - len(rows)))}")


def save_adversarial(out: Path, dirs: list[Path], batches: dict[int, list[int]], y: torch.Tensor | None) -> None:
    """adversarial.pt in `out`: the batches' adversarial examples (adv/batch-b.pt, found in one of
    `dirs`) in example order, with their indices and labels (`y` by example index, or None: read
    from the rows in out's examples.tsv)."""
    where = {b: next(d for d in dirs if (Path(d) / "adv" / f"batch-{b}.pt").exists()) for b in batches}
    order = sorted(batches)
    x_adv = torch.cat([torch.load(Path(where[b]) / "adv" / f"batch-{b}.pt") for b in order])
    idx = [i for b in order for i in batches[b]]
    if y is None:
        labels = {r["idx"]: r["label"] for r in report.read_example_rows(out / report.EXAMPLES_FILE)}
        labels_y = torch.tensor([labels[i] for i in idx])
    else:
        labels_y = y[idx].cpu()
    torch.save({"x_adv": x_adv, "y": labels_y, "idx": torch.tensor(idx)}, out / "adversarial.pt")


def _attack(cfg, settings: Attack, device, out, allow_pickle, components, save_adv, echo, progress, resume,
            log, shard, dist) -> dict:
    t0 = time.time()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s, p = settings, settings.purifier
    c = components or load_components(cfg, p, device, allow_pickle)
    idx = list(range(s.start, min(s.start + s.n_examples, len(c.y))))
    if not idx:
        raise SdepureError(f"no examples selected: start={s.start} of {len(c.y)}")
    defense = Defense(p, c.model, c.classifier, c.num_classes)
    what = ATTACK_NAMES[s.kind].format(version=s.version)
    echo(f"sdepure attack: {what} {s.norm} eps={s.eps:.4g} on {p.method} ({cfg['name']}, {len(idx)} examples "
         f"from {s.start}), t*={p.t_star}, {p.steps} {p.solver} steps, grad={p.grad}"
         + (f", votes K={p.votes}" if p.votes > 1 else "")
         + (f", {defense.resolved['variance']} ddpm variance" if defense.resolved.get("variance") else "")
         + (", fixed randomness (deterministic white-box)" if s.fixed_randomness else "")
         + f", {torch.get_num_threads()} torch thread(s)")
    if s.kind == "diffattack":
        echo(f"  {s.pgd_steps} iterations per round (CE, then DLR), {s.eot} EOT draws ({s.eot_batch} per pass), "
             f"deviated-reconstruction weight {s.dev_weight:g}")
    elif s.kind != "autoattack":
        echo(f"  {s.pgd_steps} steps of {s.step_size:.4g}, {s.eot} EOT draws ({s.eot_batch} per pass)")
    dist = dist or distributed.DistEnv()
    if dist.active and shard is not None:
        raise SdepureError("--shard and torchrun both split the batches; use one of them")
    if (dist.active or resume) and out is None:
        raise SdepureError("resuming or running under torchrun needs the run directory")

    def record_for(part, world_size):
        return runs.make_record(s.to_dict(), cfg, idx, part, world_size, format=runs.ATTACK_FORMAT,
                                device=str(device), resolved=defense.resolved, save_adv=save_adv)

    def reopen(run_dir, record):
        if save_adv and not runs.load_record(run_dir, runs.ATTACK_FORMAT).get("save_adv"):
            raise SdepureError(f"{run_dir} was started without --save-adv: its finished batches kept no adversarial "
                               f"examples; resume it without --save-adv")
        return runs.resume_attack(run_dir, record)

    own_shard = runs.Shard(dist.rank, dist.world_size) if dist.active else shard
    own = runs.attack_batches(record_for(own_shard, 1))  # b -> its examples (a shard's: every n-th batch)
    if s.fixed_randomness:  # each batch's disjoint-ball check, before anything is written
        for ib in own.values():
            diffattack.check_disjoint_balls(take(c.x, ib), ib, s.eps, s.norm)
    run_dir, done = None, []
    try:
        if out is not None:
            out, run_dir, done = _open_run(Path(out), record_for, reopen, shard, dist, resume)
            if resume:
                echo(f"{dist.prefix}resuming {run_dir}: {len({r['batch'] for r in done})} of {len(own)} batches done")
        finished = {r["batch"] for r in done}
        rows, spent, run_here = list(done), 0.0, 0
        total = sum(len(ib) for ib in own.values())
        for b, ib in own.items():
            if b in finished:
                continue
            t_batch = time.time()
            batch_rows, x_adv = attack_batch(s, defense, take(c.x, ib).to(device), c.y[ib].to(device), ib, b,
                                             device, progress)
            rows += batch_rows
            spent, run_here = spent + time.time() - t_batch, run_here + len(ib)
            if log is not None:
                log.write(dist.prefix + batch_line(rows, total, spent, run_here) + "\n")
                log.flush()
            if run_dir is not None:
                if save_adv:  # before the rows: a batch with rows has its examples
                    (run_dir / "adv").mkdir(exist_ok=True)
                    torch.save(x_adv.cpu(), run_dir / "adv" / f"batch-{b}.pt")
                report.append_example_rows(run_dir / report.EXAMPLES_FILE, batch_rows, s.fixed_randomness)
        if run_dir is not None:  # in example order, as an uninterrupted run wrote it
            tmp = run_dir / (report.EXAMPLES_FILE + ".tmp")
            report.write_example_rows(tmp, sorted(rows, key=lambda r: r["idx"]), s.fixed_randomness)
            os.replace(tmp, run_dir / report.EXAMPLES_FILE)
            if save_adv:
                save_adversarial(run_dir, [run_dir], own, c.y)
        summary = {"command": "attack", "attack": s.kind, "config": cfg["name"], "settings": s.to_dict(),
                   "device": str(device), "resolved": defense.resolved,
                   "shard": str(own_shard) if own_shard else None, **attack_summary(s, rows, peak_memory_mb(device))}
        summary["wall_seconds"] = time.time() - t0
        if run_dir is not None:
            report.write_json(run_dir / "summary.json", summary)
        if dist.active:
            distributed.barrier(dist)  # every shard is finished
            if dist.is_main:
                record, rows = runs.collect([out])
                summary = _write_merged_attack(runs.expand([out]), out, record, rows, t0)
    finally:
        distributed.shutdown(dist)
    return summary


def attack_batch(s: Attack, defense: Defense, x: torch.Tensor, y: torch.Tensor, ids: list[int], b: int, device,
                 progress=None) -> tuple[list[dict], torch.Tensor]:
    """Batch b of an attack run: its own attack, all its randomness addressed by (seed, phase, b),
    the attacked model's call counter restarted. Returns one row per example (report.EXAMPLE_COLUMNS)
    and the adversarial examples. With fixed randomness the attack, its clean and robust flags
    and the fixed_* columns use the batch's examples' known draws (diffattack.FixedRandomness);
    the other scores use fresh draws."""
    def seed(phase):
        return derive_seed(s.seed, phase, b)

    start = time.time()
    target = attacks.AttackedModel(defense, seed(AttackPhase.CALLS))
    fixed = (diffattack.FixedRandomness(defense, x, ids, derive_seed(s.seed, AttackPhase.FIXED), s.eps, s.norm)
             if s.fixed_randomness else None)
    model = fixed if fixed is not None else target  # what the attack queries
    if s.kind == "autoattack":
        x_adv, info = attacks.autoattack(model, x, y, s.eps, s.norm, s.version, seed(AttackPhase.OPTIMISE), s.batch,
                                         device, n_iter=s.pgd_steps, eot_iter=s.eot)
        clean_flags, robust_flags, broken_by = info["clean_flags"], info["robust_flags"], info["broken_by"]
    else:
        with torch.no_grad():
            target.reset(seed(AttackPhase.CLEAN_FLAGS))
            clean_flags = model(x).argmax(1).eq(y).tolist()
        target.reset(seed(AttackPhase.CALLS))
        if s.kind == "diffattack":
            x_adv, _ = diffattack.diffattack(model, x, y, s.eps, s.norm, s.pgd_steps, s.eot, s.eot_batch,
                                             s.dev_weight, seed=seed(AttackPhase.OPTIMISE), progress=progress)
        else:
            x_adv = attacks.pgd_eot(model, x, y, s.eps, s.norm, s.pgd_steps, s.step_size, s.eot,
                                    seed(AttackPhase.OPTIMISE), progress=progress, eot_batch=s.eot_batch)
        target.reset(seed(AttackPhase.ROBUST_FLAGS))
        with torch.no_grad():
            robust_flags = model(x_adv).argmax(1).eq(y).tolist()
        broken_by = [s.kind if (cl and not r) else None for cl, r in zip(clean_flags, robust_flags)]
    seconds = time.time() - start
    clean = attacks.score_defense(target, x, y, s.score_draws, seed(AttackPhase.SCORE_CLEAN), s.batch)["per_example"]
    adv = attacks.score_defense(target, x_adv, y, s.score_draws, seed(AttackPhase.SCORE_ADV), s.batch)["per_example"]
    if fixed is not None:  # one known draw: single = majority = any-of-N
        fixed_right = [attacks.score_defense(fixed, z, y, 1, 0, s.batch)["per_example"]["majority"] for z in (x, x_adv)]
    delta = (x_adv - x).flatten(1)
    rows = []
    for j, i in enumerate(ids):
        row = {"idx": i, "label": int(y[j]), "clean_correct": int(clean_flags[j]), "robust": int(robust_flags[j]),
               "broken_by": broken_by[j] or "-",
               "adv_draws_correct": adv["single"][j], "adv_majority_correct": int(adv["majority"][j]),
               "adv_any_of_n_correct": int(adv["any_of_n"][j]),
               "clean_draws_correct": clean["single"][j], "clean_majority_correct": int(clean["majority"][j]),
               "clean_any_of_n_correct": int(clean["any_of_n"][j]),
               "linf": float(delta[j].abs().max()), "l2": float(delta[j].norm()), "batch": b, "seconds": seconds}
        if fixed is not None:
            row.update(fixed_clean_correct=int(fixed_right[0][j]), fixed_adv_correct=int(fixed_right[1][j]))
        rows.append(row)
    return rows, x_adv


def _scored(rows: list[dict], prefix: str, draws: int) -> dict:
    return attacks.aggregate_scores([r[f"{prefix}_draws_correct"] for r in rows],
                                    [r[f"{prefix}_majority_correct"] for r in rows],
                                    [r[f"{prefix}_any_of_n_correct"] for r in rows], draws)


def attack_summary(s: Attack, rows: list[dict], peak_mb: float) -> dict:
    """The summary of an attack run from its rows alone (one per example, as examples.tsv holds
    them), so an interrupted, resumed or merged run summarises as an uninterrupted one. The
    attack's seconds are the sum over its batches."""
    rows = sorted(rows, key=lambda r: r["idx"])
    n = len(rows)
    what = ATTACK_NAMES[s.kind].format(version=s.version)
    clean_flags = [r["clean_correct"] for r in rows]
    broken = [r["broken_by"] for r in rows]
    order = attacks.AUTOATTACK_ORDER[s.version] if s.kind == "autoattack" else [s.kind]
    breakdown = {"clean": sum(clean_flags) / n}
    for k, name in enumerate(order):
        breakdown[name] = sum(cl and b not in order[:k + 1] for cl, b in zip(clean_flags, broken)) / n
    seconds = sum({r["batch"]: r["seconds"] for r in rows}.values())
    scores = {"fresh": (_scored(rows, "clean", s.score_draws), _scored(rows, "adv", s.score_draws))}
    summary = {
        "examples": n, "clean_accuracy": sum(clean_flags) / n,
        "robust_accuracy": sum(r["robust"] for r in rows) / n,
        "accuracy_after_each_attack": breakdown,
        "broken_by_counts": {a: broken.count(a) for a in sorted(set(broken) - {"-"})},
        "scored_over_draws": {"clean": scores["fresh"][0], "adversarial": scores["fresh"][1]},
        "max_perturbation": {"Linf": max(r["linf"] for r in rows), "L2": max(r["l2"] for r in rows)},
        "attack_seconds": seconds, "peak_memory_mb": peak_mb,
    }
    if s.fixed_randomness:
        right = {k: [r[f"fixed_{k}_correct"] for r in rows] for k in ("clean", "adv")}
        fixed = {k: attacks.aggregate_scores(v, v, v, 1) for k, v in right.items()}  # one draw: all three agree
        scores["fixed"] = (fixed["clean"], fixed["adv"])
        summary["scored_fixed_randomness"] = {"clean": fixed["clean"], "adversarial": fixed["adv"]}
    summary["table"] = attack_table(what, scores, seconds, peak_mb)
    return summary


def attack_table(what: str, scores: dict, seconds: float, peak_mb: float) -> list[dict]:
    """One row per randomness the result is scored under: "fresh" (score_draws independent
    purifications: the single-draw accuracy over all N draws with its standard error, majority
    over N, any-of-N = right in all N, DiffHammer's N-evaluation) and, with fixed randomness,
    "fixed" (the one known draw)."""
    rows = []
    for randomness, (clean, adv) in scores.items():
        row = {"attack": what, "randomness": randomness, "draws": adv["draws"]}
        for name, sc in (("clean", clean), ("robust", adv)):
            row.update({f"{name}_{k}": sc[k] for k in ("single", "single_se", "majority", "any_of_n")})
        row.update({"seconds": seconds, "peak_memory_mb": peak_mb})
        rows.append(row)
    return rows


def table_markdown(rows: list[dict]) -> str:
    """The attack table as markdown (benchmarks and the README)."""
    head = ("| attack | randomness | clean (1 / maj / all N) | robust single (+- SE) | robust majority "
            "| robust any-of-N | s | peak MB |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        se = r.get("robust_single_se")
        lines.append(f"| {r['attack']} | {r['randomness']} | {r['clean_single']:.3f} / {r['clean_majority']:.3f} / "
                     f"{r['clean_any_of_n']:.3f} | {r['robust_single']:.3f}"
                     + (f" +- {se:.3f}" if se is not None else "") + f" | {r['robust_majority']:.3f} | "
                     f"{r['robust_any_of_n']:.3f} | {r['seconds']:.0f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)
