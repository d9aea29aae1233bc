"""clsim: a simulator for continual and private learning."""

__version__ = "0.1.0"
