"""`batchmask jobs` (placeholder until the runner lands)."""

import click


@click.command("jobs")
def jobs_group() -> None:
    """Scheduled jobs (not implemented yet)."""
    raise click.ClickException("batchmask run is not implemented yet")
