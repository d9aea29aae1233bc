"""`python -m clsim ...`: the `clsim` command (clsim/cli.py)."""
import sys

from clsim.cli import main

sys.exit(main())
