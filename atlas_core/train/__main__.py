"""``python -m atlas_core.train``: see ``atlas_core.train.cli``."""

import sys

from atlas_core.train.cli import main

sys.exit(main())
