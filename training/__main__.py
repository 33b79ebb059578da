"""`python -m training`: the training subcommands of the rnnserve CLI."""

import sys

from training.cli import main

sys.exit(main())
