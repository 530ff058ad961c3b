"""`batchmask train` (placeholder until the runner lands)."""

import click


@click.command("train")
def train_cmd() -> None:
    """Train (not implemented yet)."""
    raise click.ClickException("batchmask run is not implemented yet")
