"""batchmask: pixel-level face masks for large image folders.

Python API (the CLI is a thin layer over these):

* :func:`train` - train a MobileNet U-Net from face boxes.
* :func:`evaluate` - score a model on an annotated dataset.
* :func:`load_model` / :func:`predict` - use a trained model in-process.
* :func:`run` - the Ray batch job over a local folder or an S3 bucket.
"""

from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "evaluate", "load_model", "predict", "run", "train"]


def __getattr__(name: str):
    # Lazy imports keep `import batchmask` (and `batchmask --help`) fast: Keras and Ray load
    # only when a function that needs them is used.
    if name == "train":
        from .training import train

        return train
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    if name in ("load_model", "predict"):
        from . import inference

        return getattr(inference, name)
    if name == "run":
        from .batch.runner import run

        return run
    raise AttributeError(name)
