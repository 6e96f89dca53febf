"""``python -m sparseattn.cli``: the same command as ``sparseattn``."""

import sys

from . import main

sys.exit(main())
