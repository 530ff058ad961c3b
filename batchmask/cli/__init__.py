"""The ``batchmask`` command line: a thin layer over the Python API.

Each sub-command lives in its own module and only parses options, calls the API and maps
errors to exit codes (see :mod:`batchmask.cli.common`).
"""

from __future__ import annotations

import click

from ..version import __version__
from .common import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="batchmask")
def main(verbose: int) -> None:
    """Pixel-level face masks: train a MobileNet U-Net, run it over large image folders."""
    setup_logging(verbose)


def _register() -> None:
    from .evaluate import evaluate_cmd
    from .export import export_cmd
    from .export_coco import export_coco_cmd
    from .jobs import jobs_group
    from .run import run_cmd
    from .train import train_cmd

    main.add_command(train_cmd)
    main.add_command(evaluate_cmd)
    main.add_command(run_cmd)
    main.add_command(export_cmd)
    main.add_command(jobs_group)
    main.add_command(export_coco_cmd)


_register()
