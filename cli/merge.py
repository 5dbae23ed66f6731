"""`sdepure merge`: combine the shard directories of one certify or attack run into one run directory."""
from __future__ import annotations

from pathlib import Path

import click

from sdepure import experiments


@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="New directory for the merged run (must not exist).")
def merge(dirs, out):
    """Merge the shards of one `sdepure certify` or `sdepure attack` run (made with --shard i/n,
    or by torchrun) into OUT: run.json, certify.tsv sorted by idx, certified_accuracy.png and
    summary.json; for an attack run examples.tsv sorted by example, summary.json (recomputed from
    the rows) and adversarial.pt where the shards kept theirs.

    DIRS are shard directories (a torchrun run directory stands for its shards). Refused: shards
    of different runs (the differing setting is named), certify and attack shards together, a
    shard given twice, missing or unfinished shards, an image in two shards, an existing OUT."""
    summary = experiments.merge(dirs, out)
    if summary["command"] == "attack":
        click.echo(experiments.table_markdown(summary["table"]))
        click.echo(f"merged {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'} ({summary['examples']} examples) "
                   f"into {out}: examples.tsv, summary.json")
        return
    click.echo(experiments.certified_table(summary))
    click.echo(f"merged {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'} ({summary['images']} images) "
               f"into {out}: certify.tsv, certified_accuracy.png, summary.json")
