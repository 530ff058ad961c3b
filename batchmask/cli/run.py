"""`batchmask run`: face masks for every image under a folder or S3 prefix, or in a list, with Ray."""

from __future__ import annotations

import logging
import sys

import click

from ..batch.options import PRECISIONS, RUNTIMES, RunOptions
from .common import EXIT_FAILED, exit_code_of

log = logging.getLogger(__name__)


@click.command("run")
@click.option("-i", "--input", "input_", default=None, metavar="PATH|URL",
              help="Folder or bucket prefix (s3://, gs://, az://); all images below it (recursively) are processed.")
@click.option("--input-list", default=None, metavar="LIST",
              help="Instead of --input: a .txt (one entry per line), .csv or .parquet file (local or URL) "
                   "listing the images, as local paths or URLs (s3://, gs://, az://, http(s)://).")
@click.option("--list-column", default=None, metavar="NAME",
              help="The column of --input-list's entries in a .csv or .parquet list [default: path].")
@click.option("-o", "--output", required=True, metavar="PATH|URL",
              help="Where masks/, coverage.csv, results.parquet and run.json go. Rerunning with the same output resumes.")
@click.option("-m", "--model", default=None, metavar="DIR", help="Model directory (default: the packaged model).")
@click.option("-w", "--workers", default=RunOptions.workers, show_default=True, type=click.IntRange(min=1),
              help="Ray actors, each with its own copy of the model.")
@click.option("-b", "--batch-size", default=RunOptions.batch_size, show_default=True, type=click.IntRange(min=1))
@click.option("--glob", default=None, metavar="PATTERN",
              help="Only images whose relative path or file name matches (fnmatch; * also matches /).")
@click.option("--endpoint-url", default=None, metavar="URL",
              help="S3 endpoint (SeaweedFS, MinIO, Ceph); default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL.")
@click.option("--threshold", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Face probability threshold (default: the model's, from model.json).")
@click.option("--overlays", is_flag=True,
              help="Also write JPEG previews, named after each image's mask: masks/X.png -> overlays/X.jpg.")
@click.option("--no-masks", is_flag=True,
              help="Write no PNG masks: coverage.csv and results.parquet (masks as COCO RLE) only.")
@click.option("--overwrite", is_flag=True, help="Process every image again, even those already done.")
@click.option("--retry-errors", is_flag=True, help="Process images recorded as errors again.")
@click.option("--address", default=None, metavar="ADDR",
              help="Join an existing Ray cluster ('auto' or host:port; default $RAY_ADDRESS, else a local Ray).")
@click.option("--shared-fs", is_flag=True,
              help="Local paths are visible at the same path on every node of a multi-node cluster.")
@click.option("--max-pixels", default=RunOptions.max_pixels, show_default=True, type=click.IntRange(min=1),
              help="Images with more pixels are error rows (decompression-bomb guard).")
@click.option("--max-bytes", default=RunOptions.max_bytes, show_default=True, type=click.IntRange(min=1),
              help="Files (objects) larger than this are error rows, never read (checked before reading).")
@click.option("--shard-size", default=RunOptions.shard_size, show_default=True, type=click.IntRange(min=1),
              help="Images per unit of work handed to an actor.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=RunOptions.runtime, show_default=True,
              help="What predicts: ONNX Runtime (auto: when installed; same masks, faster on CPU) or Keras.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=RunOptions.precision, show_default=True,
              help="int8: the model's int8 ONNX file (about 2x faster on CPU; README: 'batchmask export'); auto: "
                   "int8 when the model's file is within 0.003 Dice of fp32 and ONNX Runtime runs on the CPU.")
@click.option("--gpus-per-worker", default=RunOptions.gpus_per_worker, show_default=True, type=click.FloatRange(min=0),
              help="GPUs Ray gives each worker; fractions (0.25) let workers share a card.")
@click.option("--in-process-max", default=RunOptions.in_process_max, show_default=True, type=click.IntRange(min=0),
              help="Runs with at most N images to do skip Ray and run in this process (0: always Ray).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line (for cron).")
@click.option("--wait", is_flag=True, help="If another run holds the output's lock, wait for it instead of exiting 4.")
@click.option("--wait-timeout", default=None, type=click.FloatRange(min=0), metavar="S",
              help="With --wait: give up (exit 4) after S seconds.")
@click.option("--shard-timeout", default=RunOptions.shard_timeout, type=click.FloatRange(min=0, min_open=True),
              metavar="S", help="A shard that makes no progress for S seconds is stopped and retried; twice fails "
                                f"the run [default: {RunOptions.shard_timeout:g}].")
def run_cmd(input_: str | None, output: str, **options) -> None:
    """Predict face masks for every image under --input (or listed in --input-list) and write them to --output.

    Exit codes: 0 all images ok, 3 some images failed (see coverage.csv), 1 the run failed,
    4 another run holds the output's lock, 5 this run lost the output's lock midway.
    """
    from ..batch.lock import LockLost, OutputLocked
    from ..batch.runner import RunError, run
    from ..batch.storage import redact_urls
    from ..inference import ModelNotFoundError

    quiet = options["quiet"]
    if bool(input_) == bool(options["input_list"]):
        raise click.UsageError("--input and --input-list are mutually exclusive" if input_ else
                               "give --input (a folder or prefix) or --input-list (a list of images)")
    if options["list_column"] is not None and not options["input_list"]:
        raise click.UsageError("--list-column names the column of --input-list's entries; give --input-list too")
    try:
        if not options["wait"]:
            options["wait_timeout"] = None  # --wait-timeout means nothing without --wait
        summary = run(input_, output, RunOptions(**options))
    except KeyboardInterrupt:
        click.echo("Interrupted: finished images are saved; run the same command again to continue.", err=True)
        sys.exit(EXIT_FAILED)
    except OutputLocked as exc:
        click.echo(f"batchmask: {exc}; exit {exit_code_of(exc)}", err=True)
        sys.exit(exit_code_of(exc))
    except LockLost as exc:
        click.echo(f"Error: {redact_urls(str(exc))}", err=True)
        sys.exit(exit_code_of(exc))
    except (RunError, ModelNotFoundError, OSError) as exc:  # StorageError is an OSError
        click.echo(f"Error: {redact_urls(str(exc))}", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # unexpected: still one line (the traceback with -v)
        log.debug("the run failed", exc_info=True)
        click.echo(f"Error: {type(exc).__name__}: {(redact_urls(str(exc)).strip().splitlines() or [''])[-1]}", err=True)
        sys.exit(EXIT_FAILED)
    if not quiet:
        click.echo(summary.line(), err=True)
        if summary.failed:
            click.echo(f"{summary.failed} images failed: see the 'error' column of {output.rstrip('/')}/coverage.csv",
                       err=True)
    sys.exit(summary.exit_code)
