"""Shared CLI helpers: logging set-up, exit codes, error mapping."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import click

from ..exits import (  # noqa: F401  (re-exported for the commands)
    EXIT_FAILED,
    EXIT_IMAGES_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    exit_code_of,
)


def setup_logging(verbose: int = 0) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("batchmask").setLevel(level)
    # Quieter TensorFlow start-up unless asked for debug output.
    if verbose < 2:
        from ..tfquiet import install

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        install()


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Turn expected errors (bad data, missing files) into one line and EXIT_FAILED."""
    try:
        yield
    except types as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
