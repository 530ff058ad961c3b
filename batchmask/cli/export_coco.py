"""`batchmask export-coco`: a run's results as a COCO instances JSON."""

from __future__ import annotations

import sys

import click

from .common import EXIT_FAILED


@click.command("export-coco")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("-o", "--output", "dest", default=None, metavar="FILE",
              help="Where the JSON goes (a local path; default: coco.json in OUT_DIR).")
@click.option("--endpoint-url", default=None, metavar="URL", help="S3 endpoint, when OUT_DIR is s3://.")
def export_coco_cmd(out_dir: str, dest: str | None, endpoint_url: str | None) -> None:
    """Write the results.parquet of the run output OUT_DIR as COCO instances JSON: one annotation
    per face region (RLE segmentation, bbox, score), category 'face'."""
    from ..batch.coco import ExportError, export_coco
    from ..batch.storage import redact_urls

    try:
        where, s = export_coco(out_dir, dest, endpoint_url)
    except (ExportError, OSError, ValueError) as exc:
        click.echo(f"Error: {redact_urls(str(exc))}", err=True)
        sys.exit(EXIT_FAILED)
    extra = f", {s.left_out} left out (no RLE recorded)" if s.left_out else ""
    click.echo(f"{where}: {s.images} images, {s.annotations} face annotations{extra}", err=True)
