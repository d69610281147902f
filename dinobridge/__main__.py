"""`python -m dinobridge <command> [args]`: the `dinobridge` command without the console script (e.g. a Python
whose scripts folder is not on PATH)."""

import sys

from dinobridge.cli import main

sys.exit(main())
