"""`python -m session`: the operator's command line (see `session.cli`)."""

import sys

from .cli import main

sys.exit(main())
