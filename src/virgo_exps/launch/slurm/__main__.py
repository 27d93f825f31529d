"""``python -m virgo_exps.launch.slurm STAGE``: print a stage's batch script (dry run)."""

import sys

from virgo_exps.launch.slurm.submit import main

sys.exit(main())
