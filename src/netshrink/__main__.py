"""``python -m netshrink`` (and ``torchrun -m netshrink``): the command line."""

import sys

from netshrink.cli import main

sys.exit(main())
