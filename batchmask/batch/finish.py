"""The end of a run's bookkeeping: the driver's rows and the merge, ``run.json``, the output
lock's release. When the run is already failing (storage gone or stalled, interrupted), each
gets at most ``FAILING_IO_S`` in a daemon thread (:func:`_bounded`), and its failure is logged
instead of hiding the first one.

Apart from :mod:`.runner` (``run()`` and its listing) because none of it depends on the run's
state beyond what it is handed. All of it is importable from :mod:`.runner`.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from .lock import OutputLock
from .outputs import RUN_JSON, merge_parts, part_name, rows_to_csv
from .storage import Storage, redact_urls

log = logging.getLogger("batchmask.batch.runner")  # one logger for a run's messages, as before the split

#: When a run is already failing (storage gone or stalled, interrupted), each remaining piece of
#: bookkeeping (driver rows and merge, run.json, the lock's release) gets this long: a stalled S3
#: endpoint held the exit for more than 14 minutes in a PUT despite the client's timeouts.
FAILING_IO_S = float(os.environ.get("BATCHMASK_FAILING_IO_TIMEOUT", "60"))


def _save_rows(out: Storage, run_id: str, driver_rows: list[dict], merge: bool, failing: bool, info: dict) -> None:
    """Write the driver's rows and merge part files; when the run is already failing (e.g. the
    storage went away), a failure here is logged and recorded instead of hiding the first one."""
    def save() -> None:
        if driver_rows:
            out.write_bytes(part_name(run_id, 9_999_999), rows_to_csv(driver_rows))
        if merge:  # else no part files: coverage.csv is already merged
            merge_parts(out)

    try:
        _bounded(save, "merging the finished rows") if failing else save()
    except Exception as exc:
        if not failing:
            raise
        info["merge_error"] = redact_urls(str(exc))[:500]
        log.warning("could not merge the finished rows (%s); the next run merges them", redact_urls(str(exc)))


def _write_run_json(out: Storage, info: dict, failing: bool) -> None:
    data = (json.dumps(info, indent=2, default=str) + "\n").encode()
    try:
        _bounded(lambda: out.write_bytes(RUN_JSON, data), f"writing {RUN_JSON}") if failing \
            else out.write_bytes(RUN_JSON, data)
    except Exception as exc:
        if not failing:
            raise
        log.warning("could not write %s: %s", RUN_JSON, redact_urls(str(exc)))


def _release(lock: OutputLock, failing: bool) -> None:
    if not failing:
        lock.release()
        return
    try:
        _bounded(lock.release, "releasing the output lock")
    except Exception as exc:  # an S3 lock left behind expires by itself
        log.warning("could not release the output lock: %s", redact_urls(str(exc)))


def _bounded(fn, what: str) -> None:
    """Run ``fn`` (bookkeeping of a failing run) in a daemon thread; give up after FAILING_IO_S."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    t = threading.Thread(target=target, name="batchmask-finish", daemon=True)
    t.start()
    t.join(FAILING_IO_S)
    if t.is_alive():
        raise TimeoutError(f"{what}: the storage did not answer within {FAILING_IO_S:.0f} s")
    if errors:
        raise errors[0]
