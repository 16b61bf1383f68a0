"""`python -m attendo`: the attendo command, also under launchers such as `torchrun -m attendo`."""

import sys

from attendo.cli import main

sys.exit(main())
