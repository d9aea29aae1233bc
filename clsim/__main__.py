"""`python -m clsim ...`: the `clsim` command (run_scenario.py's options, or sweep / report)."""
import sys

from clsim.commands import main

sys.exit(main())
