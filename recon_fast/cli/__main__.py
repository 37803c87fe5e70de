"""`python -m recon_fast.cli`: the `recon-fast` program."""

import sys

from recon_fast.cli import main

sys.exit(main())
