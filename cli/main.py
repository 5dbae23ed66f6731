"""The `sdepure` command: errors in the user's input become one line on stderr and exit 1 or 2."""
from __future__ import annotations

import sys

import click

from sdepure.errors import SdepureError

from .attack import attack
from .certify import certify
from .gradcheck import gradcheck
from .merge import merge
from .models import models
from .train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdepure")
def app():
    """sdepure: diffusion purification (DensePure, DiffPure, Carlini et al.) and honest
    robustness measurement: randomized-smoothing certificates and adaptive attacks."""


app.add_command(attack)
app.add_command(certify)
app.add_command(gradcheck)
app.add_command(merge)
app.add_command(models)
app.add_command(train)


def _say(message: str) -> None:
    click.echo(f"sdepure: error: {' '.join(str(message).split())}", err=True)


def run(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code instead of raising."""
    try:
        result = app.main(args=argv, prog_name="sdepure", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        _say(e.format_message())
        return 2
    except click.ClickException as e:
        _say(e.format_message())
        return e.exit_code
    except SdepureError as e:
        _say(str(e))
        return 1
    except (click.Abort, KeyboardInterrupt):
        click.echo("sdepure: interrupted", err=True)
        return 130


def main() -> None:
    sys.exit(run())
