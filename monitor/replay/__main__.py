"""``python -m monitor.replay replay|verify ...``: the same as ``agent-monitor replay|verify``."""

import sys

from monitor.cli import main

sys.exit(main())
