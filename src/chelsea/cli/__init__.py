"""The ``chelsea`` command: ``demo``, ``generate``, ``eval``, ``report``, ``analyze``, ``bench``,
``serve``, ``calibrate``, ``models`` and ``methods``, one module per group; bad input ends with one line and exit code 2."""

from __future__ import annotations

import os
import sys

import typer

from ..errors import ChelseaError
from . import bench, calibrate, evaluate, generate, serve  # noqa: F401  (each registers its commands)
from .options import app


def main() -> None:
    """Entry point: run the app, turning bad input into a one-line error and exit code 2."""
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints results
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        app(standalone_mode=False)
    except ChelseaError as err:
        typer.secho(f"Error: {err}", fg="red", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


__all__ = ["app", "main"]
