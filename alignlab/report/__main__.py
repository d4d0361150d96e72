"""`python -m alignlab.report ...`, the same as `alignlab report ...`."""

import sys

from alignlab.report.cli import main

sys.exit(main())
