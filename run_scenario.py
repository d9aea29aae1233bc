#!/usr/bin/env python
"""Run a continual-learning scenario: python run_scenario.py --scenario split_digits --strategy ewc"""
import sys

from clsim.cli import main

if __name__ == "__main__":
    sys.exit(main())
