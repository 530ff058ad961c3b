"""Exit codes shared by every command (README.md, "Exit codes"), and which error gets which.

Click's convention: an exception class that means a specific exit code says so in an
``exit_code`` attribute (:class:`~batchmask.batch.lock.OutputLocked`,
:class:`~batchmask.jobs.execute.JobLocked`: :data:`EXIT_LOCKED`); every other error of a command
that could not do its work is :data:`EXIT_FAILED`. Core modules import codes from here, never
from :mod:`batchmask.cli`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the command could not do its work (bad input data, missing model, crash)
EXIT_USAGE = 2  # bad command-line usage (click's own code)
EXIT_IMAGES_FAILED = 3  # `run`: finished, but some images could not be processed
EXIT_LOCKED = 4  # `run`/`jobs run`: another run holds the output's (or the job's) lock
EXIT_LOCK_LOST = 5  # `run`/`jobs run`: the run lost the output's lock midway (paused or cut off past its TTL)


def exit_code_of(exc: BaseException) -> int:
    """The exit code for an error that stopped a command: its class's ``exit_code``, else EXIT_FAILED."""
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else EXIT_FAILED
