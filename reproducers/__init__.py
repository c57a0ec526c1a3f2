"""chipcheck.reproducers: capture a failing step, replay it against a reference, shrink it to one file.

`from chipcheck.reproducers import capture`; `with capture("out/cap"):` around an eager step on every
rank. See docs/reproducers.md. Imports go one way: this package may import model, probes and results;
only cli.py imports it.
"""

from .capture import capture

__all__ = ["capture"]
