"""`python -m hyparflow` is the `hyparflow` command."""

import sys

from hyparflow.cli import main

sys.exit(main())
