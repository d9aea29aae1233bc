"""`python -m clsim ...`: the same command line as run_scenario.py and clsim-run."""
import sys

from clsim.cli import main

sys.exit(main())
