"""The training's Keras callbacks and what it writes per epoch: the time limit, early stopping that
a resumed training continues, the resume state saved after each epoch, history.csv and the
learning curves. Apart from :mod:`batchmask.training` so the loop reads as the loop.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

from .checkpoint import TrainState, hold_at_test_gate, save_state

log = logging.getLogger("batchmask.training")  # the training's log lines, wherever they are made

#: Checkpoint and early-stopping criterion. Per-image Dice at 0.5, like the metric models are
#: judged by; the batch soft Dice (``val_dice``) picked an epoch 0.03 Dice worse on the held-out
#: event when the loss's Dice term is per image (docs/experiments.md).
MONITOR = "val_dice_t50"


def time_limit_callback(deadline: float | None):
    import keras

    class TimeLimit(keras.callbacks.Callback):
        """Log each epoch; stop at the end of the first epoch that finishes after ``deadline``."""

        hit = False

        def on_epoch_end(self, epoch, logs=None):
            log.info("epoch %d: %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items()))
            if deadline is not None and time.time() > deadline:
                log.warning("time limit reached after epoch %d; keeping the best epoch so far", epoch + 1)
                self.model.stop_training = True
                self.hit = True

    return TimeLimit()


def early_stopping(state: TrainState, patience: int):
    """Early stopping that starts from the history's count (a resumed training stops when the
    uninterrupted one would)."""
    import keras

    best, wait = state.best(MONITOR, phase="finetune")

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if best is not None:
                self.best, self.wait = best, wait

    return ResumableEarlyStopping(monitor=MONITOR, mode="max", patience=patience, verbose=1)


def epoch_state(out_dir: Path, state: TrainState, phase: str, schedule, elapsed):
    """A callback that adds each epoch's row (with its learning rate) to ``state.history`` and saves
    the resume state."""
    import keras

    class EpochState(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            opt = self.model.optimizer
            row: dict[str, Any] = {"epoch": epoch + 1, "phase": phase}
            row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
            row["learning_rate"] = float(keras.ops.convert_to_numpy(schedule(opt.iterations - 1)))
            state.history.append(row)
            state.epoch, state.phase, state.elapsed_s = epoch + 1, phase, elapsed()
            save_state(out_dir, self.model, opt, state)
            hold_at_test_gate(epoch + 1)

    return EpochState()


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_history(path: Path, rows: list[dict[str, float]], finetune_epoch: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "dice", "Dice (solid: batch soft Dice)")):
        ax.plot(ep, [r.get(key) for r in rows], label="train")
        ax.plot(ep, [r.get(f"val_{key}") for r in rows], label="validation")
        if key == "dice" and "val_dice_t50" in rows[0]:
            ax.plot(ep, [r.get("val_dice_t50") for r in rows], "--", label="validation Dice@0.5 per image")
        if finetune_epoch is not None:
            ax.axvline(finetune_epoch - 0.5, color="grey", lw=0.8, ls=":", label="fine-tuning starts")
        if key == "loss":
            ax.set_yscale("log")  # the first validation losses can be 10x the rest
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
