"""``python -m slurmsim``: start, inspect or stop the local Slurm cluster."""

import sys

from slurmsim import main

sys.exit(main())
