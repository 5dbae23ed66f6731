"""`sdepure models`: supported model families, the files each expects, shipped configs."""
from __future__ import annotations

import click

from sdepure.classifiers import CLASSIFIER_FAMILIES
from sdepure.config import config_names, load_config
from sdepure.data import DATASETS
from sdepure.models import SCORE_FAMILIES


def _section(title: str, rows: dict) -> None:
    click.echo(title)
    for name, info in rows.items():
        what, expects = info if isinstance(info, tuple) else (info, None)
        click.echo(f"  {name}")
        click.echo(f"      {what}")
        if expects:
            click.echo(f"      file: {expects}")


@click.command()
def models():
    """List score-model and classifier families, datasets, and the shipped configs."""
    _section("score-model families ([model] family):", SCORE_FAMILIES)
    _section("classifier families ([classifier] family):", CLASSIFIER_FAMILIES)
    _section("datasets ([data] dataset):", DATASETS)
    click.echo("configs (--config NAME; paths come from ${SDEPURE_*} variables or --model-weights, "
               "--classifier-weights, --data-root):")
    for name in config_names():
        cfg = load_config(name)
        click.echo(f"  {name:24s} {cfg.get('description', '')}")
