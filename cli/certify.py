"""`sdepure certify`: certified L2 accuracy of a purified classifier by randomized smoothing."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from sdepure import distributed, experiments, runs
from sdepure.plan import describe, plan
from sdepure.config import load_config
from sdepure.errors import SdepureError
from sdepure.precision import PRECISIONS
from sdepure.settings import METHODS, Certify, certify_from_config
from sdepure.solvers import SOLVERS

from .common import apply_paths, check_out, common_options, default_out, resolve_device


@click.command()
@click.option("--config", "config_name", default="digits", show_default=True,
              help="Shipped config name or path to a TOML file.")
@click.option("--method", type=str, help=f"One of {', '.join(METHODS)}.")
@click.option("--sigma", type=float, help="Smoothing noise on [0, 1] images.")
@click.option("--n0", type=int, help="Noise draws to select the top class.")
@click.option("--n", "n", type=int, help="Noise draws to estimate its probability.")
@click.option("--alpha", type=float, help="Failure probability of each certificate.")
@click.option("--votes", type=int, help="DensePure: reverse runs per noise draw (K).")
@click.option("--steps", type=int, help="Reverse-process steps.")
@click.option("--solver", type=str, help=f"One of {', '.join(SOLVERS)}.")
@click.option("--eta", type=float, help="ddim solver: noise level in [0, 1] (0, the default: deterministic).")
@click.option("--precision", type=str, help=f"Network arithmetic: {', '.join(PRECISIONS)} (autocast; fp32 default).")
@click.option("--variance", type=str, help="ddpm solver's step variance: auto (default: the model's learned variance "
              "where it has one, as DensePure ran its checkpoints), learned, posterior or beta.")
@click.option("--rng", type=str, help="Gaussian draws: device (default; on the CPU identical to cpu) or cpu "
              "(the device-independent CPU stream, moved to the device).")
@click.option("--full-vote", is_flag=True, default=None,
              help="DensePure: evaluate all K runs of every draw (the default early stop gives the same labels).")
@click.option("--sampling", type=str, help="Estimation draws per image: fixed (Cohen's n, default), iss "
              "(input-specific, --n is the cap) or sequential (anytime-valid at --radii, --n is the cap).")
@click.option("--radius-tol", type=str, help="iss: the radius the fewer draws may lose against --n (default 0.05).")
@click.option("--radii", type=str, help="sequential: target radii, increasing, e.g. 0,0.25,0.5.")
@click.option("--batch", type=int, help="Noise draws per forward pass (x votes rows).")
@click.option("--start", type=int, help="First test image index.")
@click.option("--stop", type=int, help="Stop before this image index.")
@click.option("--skip", type=int, help="Take every skip-th image.")
@click.option("--shard", type=str, help="i/n: certify every n-th selected image, starting at the i-th (0-based).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print what the run would cost (network calls, one forward pass, projected wall time) after "
                   "certifying a few images to measure it; write nothing.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue the run in this directory (its recorded settings; flags given must agree).")
@common_options
def certify(config_name, method, sigma, n0, n, alpha, votes, steps, solver, eta, variance, precision, rng, full_vote,
            sampling, radius_tol, radii, batch, start, stop, skip, shard, plan_only, resume, seed, device, out,
            allow_pickle, model_weights, classifier_weights, data_root):
    """Certify a purified classifier with randomized smoothing (Cohen et al.).

    Writes run.json at the start, certify.tsv (idx label predict radius correct time) row by row,
    then certified_accuracy.png and summary.json to --out, and prints certified accuracy at a
    range of L2 radii. Under torchrun each process certifies one shard and rank 0 merges them."""
    ctx = click.get_current_context()
    given = {name: ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
             for name in ("config_name", "seed")}
    env = distributed.from_environ()
    part = runs.parse_shard(shard) if shard is not None else None
    overrides = dict(name=method, sigma=sigma, votes=votes, steps=steps, solver=solver, eta=eta, variance=variance,
                     precision=precision, rng=rng, early_stop=False if full_vote else None, n0=n0, n=n, alpha=alpha,
                     batch=batch, start=start, stop=stop, skip=skip, seed=seed if given["seed"] else None,
                     sampling=sampling, radius_tol=radius_tol, radii=radii)
    if resume is not None:
        if out is not None:
            raise SdepureError("--resume continues the run in its own directory; drop --out")
        record = runs.load_record(resume)
        runs.check_world_size(resume, record, env.world_size)
        # without --config, the run's own config tables and settings; flags and a config given must agree
        if given["config_name"]:
            cfg, base = load_config(config_name), None
        else:
            cfg, base = runs.config_from_record(record), Certify.from_dict(record["settings"])
        overrides["seed"] = seed if given["seed"] else record["settings"]["seed"]
        part = part or runs.record_shard(record)
    else:
        cfg, base = load_config(config_name), None
        overrides["seed"] = seed
    cfg = apply_paths(cfg, model_weights, classifier_weights, data_root)
    settings = certify_from_config(cfg, overrides, base)
    dev = distributed.device_for(env, resolve_device(device))
    if plan_only:
        if resume is not None or out is not None:
            raise SdepureError("--plan writes nothing; drop --resume and --out")
        click.echo(describe(plan(cfg, settings, dev, processes=env.world_size, shard=part, allow_pickle=allow_pickle)))
        return
    p = settings.purifier
    if resume is not None:
        out = resume
    elif out is not None or not env.active:  # under torchrun rank 0 names the default directory
        out = check_out(out or default_out("certify", cfg["name"], p.method, f"sigma{p.sigma}"))
    else:
        out = default_out("certify", cfg["name"], p.method, f"sigma{p.sigma}")
    summary = experiments.certify(cfg, settings, dev, out, allow_pickle, echo=click.echo, log=sys.stderr,
                                  resume=resume is not None, shard=part, dist=env)
    if not env.is_main:
        click.echo(f"{env.prefix}shard {env.rank}/{env.world_size} done ({len(summary['rows'])} images); "
                   f"rank 0 merges")
        return
    click.echo(experiments.certified_table(summary))
    if summary["mean_draws_per_image"] is not None:
        click.echo(f"per image: {summary['mean_draws_per_image']:.0f} draws, "
                   f"{summary['mean_network_calls_per_image']:.0f} network calls, "
                   f"{summary['mean_seconds_per_image']:.2f} s")
    click.echo(f"wrote {summary['run_dir']}/certify.tsv, certified_accuracy.png, summary.json "
               f"({summary['wall_seconds']:.1f} s)")
