"""Old import path of :mod:`batchmask.inference.pixels` (the same module object, not a copy)."""

import sys

from .inference import pixels

sys.modules[__name__] = pixels
