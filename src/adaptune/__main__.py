"""``python -m adaptune`` (and ``torchrun -m adaptune``) runs the command line."""

import sys

from adaptune.cli.parser import main

sys.exit(main())
