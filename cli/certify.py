"""`sdepure certify`: certified L2 accuracy of a purified classifier by randomized smoothing."""
from __future__ import annotations

import click
from tqdm import tqdm

from sdepure import experiments
from sdepure.config import load_config
from sdepure.settings import METHODS, certify_from_config
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
@click.option("--batch", type=int, help="Noise draws per forward pass (x votes rows).")
@click.option("--start", type=int, help="First test image index.")
@click.option("--stop", type=int, help="Stop before this image index.")
@click.option("--skip", type=int, help="Take every skip-th image.")
@common_options
def certify(config_name, method, sigma, n0, n, alpha, votes, steps, solver, batch, start, stop, skip,
            seed, device, out, allow_pickle, model_weights, classifier_weights, data_root):
    """Certify a purified classifier with randomized smoothing (Cohen et al.).

    Writes certify.tsv (idx label predict radius correct time), certified_accuracy.png and
    summary.json to --out, and prints certified accuracy at a range of L2 radii."""
    cfg = apply_paths(load_config(config_name), model_weights, classifier_weights, data_root)
    settings = certify_from_config(cfg, dict(name=method, sigma=sigma, votes=votes, steps=steps, solver=solver,
                                             n0=n0, n=n, alpha=alpha, batch=batch, start=start, stop=stop,
                                             skip=skip, seed=seed))
    dev = resolve_device(device)
    p = settings.purifier
    out = check_out(out or default_out("certify", cfg["name"], p.method, f"sigma{p.sigma}"))
    components = experiments.load_components(cfg, p, dev, allow_pickle)
    total = len(experiments.selected_images(settings, len(components.x))) * (settings.n0 + settings.n)
    with tqdm(total=total, unit="draw", desc="certify", leave=False) as bar:
        summary = experiments.certify(cfg, settings, dev, out, components=components, echo=click.echo,
                                      progress=bar.update)
    click.echo(experiments.certified_table(summary))
    click.echo(f"wrote {out}/certify.tsv, certified_accuracy.png, summary.json ({summary['wall_seconds']:.1f} s)")
