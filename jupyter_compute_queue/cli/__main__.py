"""``python -m jupyter_compute_queue.cli …`` is ``jupyter compute-queue …``."""

import sys

from .main import main

sys.exit(main())
