"""Old import path of :mod:`batchmask.inference.backends` (the same module object, not a copy)."""

import sys

from .inference import backends

sys.modules[__name__] = backends
