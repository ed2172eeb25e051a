"""``python -m netshrink.cli``: the command line (as ``python -m netshrink``)."""

import sys

from netshrink.cli import main

sys.exit(main())
