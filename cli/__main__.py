"""`python -m chipcheck.cli`."""

from . import main

main()
