"""netshrink: make CNNs smaller and faster, and prove what was gained."""

__version__ = "0.1.0"
