"""`python -m batchmask` == `batchmask`."""

from .cli import main

main()
