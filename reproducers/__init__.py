"""chipcheck.reproducers: capture a failing step, replay it against a reference, shrink it to one file.

`from chipcheck.reproducers import capture`; `with capture("out/cap"):` around an eager step on every
rank. `FlightRecorder` (flight.py): always on, a snapshot of each step's starting state, the capture
afterwards by re-executing it. See docs/reproducers.md. Imports go one way: this package may import model, probes and results;
only the cli package imports it.
"""

from .capture import capture
from .flight import FlightRecorder

__all__ = ["FlightRecorder", "capture"]
