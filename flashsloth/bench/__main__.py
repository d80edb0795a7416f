"""`python -m flashsloth.bench`: the speed benchmark's command line."""

import sys

from .cli import main

sys.exit(main())
