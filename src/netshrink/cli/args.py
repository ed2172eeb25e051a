"""Options several commands share, declared once."""

from __future__ import annotations

import argparse
from pathlib import Path


def data_args(p: argparse.ArgumentParser, *, default: str | None = "fashion_mnist") -> None:
    """``--data`` (a dataset's name; ``default`` None: the one the model file records) and
    ``--data-dir``."""
    p.add_argument("--data", default=default,
                   help="dataset name (netshrink list datasets)" + (
                       "" if default else "; default: the one the model file records"))
    p.add_argument("--data-dir", type=Path,
                   help="folder holding the dataset's files (default: its usual place)")
