"""Resumable training: the state saved after every epoch in ``OUT/.resume/``.

What a training needs to go on exactly where it stopped: the network's weights, the optimizer's
variables (its step count is the learning-rate schedule's position, its moments Adam's memory),
the history so far (which also gives the best-so-far and early stopping's count), the best
epoch's weights, and the arguments it was started with. The augmentation draws need nothing
saved: they are seeded per (seed, epoch, batch).

The state is written to a temporary folder and renamed into place, so a training killed while
saving leaves the previous epoch's state whole.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESUME_DIR = ".resume"
STATE_FILE = "state.json"
WEIGHTS_FILE = "last.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
BEST_FILE = "best.weights.h5"
STATE_VERSION = 1
#: Test hook, never set in production: "N:/path". After saving epoch N's state the training
#: creates ``/path.reached`` and waits (at most 10 minutes) until ``/path`` exists, so a test can
#: kill it at a known point instead of racing it.
TEST_GATE_ENV = "BATCHMASK_TEST_TRAIN_GATE"


class ResumeError(ValueError):
    """There is nothing to resume in the folder, or its state does not fit."""


@dataclass
class TrainState:
    """The JSON part of the saved state."""

    #: Epochs completed (the next one to run is ``epoch + 1``, counted from 1).
    epoch: int
    #: The phase whose optimizer state is saved ("decoder" or "finetune").
    phase: str
    history: list[dict[str, Any]]
    #: ``train()``'s arguments: config (TrainConfig.to_dict()), data, val_data, limit, command.
    args: dict[str, Any]
    #: Wall seconds of the earlier sittings, so model.json reports the whole training's time.
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self, monitor: str, phase: str | None = None) -> tuple[float | None, int]:
        """The best ``monitor`` so far (in ``phase`` only when given) and the epochs since it."""
        rows = [r for r in self.history if phase is None or r.get("phase") == phase]
        if not rows:
            return None, 0
        i = max(range(len(rows)), key=lambda k: rows[k].get(monitor, -1.0))
        return float(rows[i][monitor]), len(rows) - 1 - i


def resume_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / RESUME_DIR


def best_weights_path(out_dir: str | os.PathLike) -> Path:
    return resume_dir(out_dir) / BEST_FILE


def save_state(out_dir: str | os.PathLike, net, optimizer, state: TrainState) -> None:
    """Write the epoch's state beside the best weights, replacing the previous epoch's."""
    d = resume_dir(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    net.save_weights(str(tmp / WEIGHTS_FILE))
    np.savez(tmp / OPTIMIZER_FILE, *[np.asarray(v) for v in optimizer.variables])
    (tmp / STATE_FILE).write_text(json.dumps({"version": STATE_VERSION, "saved_at": time.time(),
                                              **state.__dict__}, indent=1) + "\n")
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):  # the state file last: it marks a whole set
        os.replace(tmp / name, d / name)
    tmp.rmdir()


def hold_at_test_gate(epoch: int) -> None:
    at, _, gate = os.environ.get(TEST_GATE_ENV, "").partition(":")
    if not gate or int(at) != epoch:
        return
    Path(f"{gate}.reached").write_text(f"{epoch}\n")
    deadline = time.time() + 600
    while not Path(gate).exists() and time.time() < deadline:
        time.sleep(0.05)


def load_state(out_dir: str | os.PathLike) -> TrainState:
    path = resume_dir(out_dir) / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"{out_dir}: nothing to resume (no {RESUME_DIR}/{STATE_FILE}: the training finished, "
                          "or it stopped before its first epoch ended)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ResumeError(f"{path}: unreadable resume state ({exc})") from exc
    if raw.get("version") != STATE_VERSION:
        raise ResumeError(f"{path}: resume state version {raw.get('version')} is not {STATE_VERSION}")
    return TrainState(epoch=raw["epoch"], phase=raw["phase"], history=raw["history"], args=raw["args"],
                      elapsed_s=raw.get("elapsed_s", 0.0), extra=raw.get("extra", {}))


def restore_weights(out_dir: str | os.PathLike, net) -> None:
    net.load_weights(str(resume_dir(out_dir) / WEIGHTS_FILE))


def restore_optimizer(out_dir: str | os.PathLike, net, optimizer) -> None:
    """Build ``optimizer`` for ``net``'s trainable variables and load the saved variables into it."""
    with np.load(resume_dir(out_dir) / OPTIMIZER_FILE) as z:
        arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    optimizer.build(net.trainable_variables)
    variables = list(optimizer.variables)
    if len(variables) != len(arrays) or any(tuple(v.shape) != a.shape for v, a in zip(variables, arrays, strict=True)):
        raise ResumeError(f"{out_dir}: the saved optimizer state does not fit this network "
                          f"({len(arrays)} saved variables, {len(variables)} expected)")
    for v, a in zip(variables, arrays, strict=True):
        v.assign(a)


def clear(out_dir: str | os.PathLike) -> None:
    shutil.rmtree(resume_dir(out_dir), ignore_errors=True)
