"""`batchmask run` (placeholder until the runner lands)."""

import click


@click.command("run")
def run_cmd() -> None:
    """Predict face masks for every image under --input (not implemented yet)."""
    raise click.ClickException("batchmask run is not implemented yet")
