"""`sdepure merge`: combine the shard directories of one certify run into one run directory."""
from __future__ import annotations

from pathlib import Path

import click

from sdepure import experiments


@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="New directory for the merged run (must not exist).")
def merge(dirs, out):
    """Merge the shards of one `sdepure certify` run (made with --shard i/n, or by torchrun)
    into OUT: run.json, certify.tsv sorted by idx, certified_accuracy.png, summary.json.

    DIRS are shard directories (a torchrun run directory stands for its shards). Refused: shards
    of different runs (the differing setting is named), a shard given twice, missing or
    unfinished shards, an image in two shards, an existing OUT."""
    summary = experiments.merge(dirs, out)
    click.echo(experiments.certified_table(summary))
    click.echo(f"merged {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'} ({summary['images']} images) "
               f"into {out}: certify.tsv, certified_accuracy.png, summary.json")
