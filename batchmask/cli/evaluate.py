"""`batchmask evaluate` (placeholder until the runner lands)."""

import click


@click.command("evaluate")
def evaluate_cmd() -> None:
    """Score a model (not implemented yet)."""
    raise click.ClickException("batchmask run is not implemented yet")
