"""TensorFlow's start-up lines off the terminal (``-q`` and cron mean: silent unless something is wrong).

Importing TensorFlow 2.2x prints, from C++ and before anything can configure it,
``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR`` and
``oneDNN custom operations are on ...`` (twice: two shared libraries), whatever
``TF_CPP_MIN_LOG_LEVEL`` says; no environment variable turns absl's pre-init logging off.
Keras's ONNX export imports a module that raises a ``FutureWarning`` about ``np.object``.

:func:`install` (the CLI calls it unless ``-vv``) adds an import hook that points file
descriptor 2 at a temporary file while the ``tensorflow`` package itself is imported, and
passes what was written there to this module's logger at DEBUG; and it filters that
FutureWarning. A failing import still raises its Python exception as usual.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

log = logging.getLogger(__name__)

_HIDDEN = ("tensorflow",)


@contextlib.contextmanager
def fd2_hidden(what: str) -> Iterator[None]:
    """Point file descriptor 2 at a temporary file for the duration; log what landed there at DEBUG."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            with contextlib.suppress(OSError):
                sink.seek(0)
                text = sink.read().decode("utf-8", "replace").strip()
                if text:
                    log.debug("%s wrote to stderr:\n%s", what, text[-4000:])


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        with fd2_hidden(f"importing {module.__name__}"):
            self.inner.exec_module(module)

    def __getattr__(self, name: str):  # resource readers, get_data, ...: the real loader's
        return getattr(self.inner, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, name, path, target=None):
        if name not in _HIDDEN or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Hide TensorFlow's import-time C++ lines and Keras's export FutureWarning in this process (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"keras\.src\.export\.tf2onnx_lib")
    warnings.filterwarnings("ignore", message=r".*np\.object.*", category=FutureWarning)
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
