"""`python -m dst` is the `dst` command."""

import sys

from dst.cli.main import main

sys.exit(main())
