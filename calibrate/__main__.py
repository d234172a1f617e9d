"""`python -m calibrate ...` is the same as the `calibrate` console script."""

import sys

from .cli import main

sys.exit(main())
