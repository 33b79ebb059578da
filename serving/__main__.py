"""`python -m serving`: the rnnserve command line."""

import sys

from serving.cli import main

sys.exit(main())
