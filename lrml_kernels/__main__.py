"""``python -m lrml_kernels`` = the ``lrml`` command."""

import sys

from lrml_kernels.cli import main

sys.exit(main())
