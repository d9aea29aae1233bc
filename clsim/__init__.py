"""clsim: a simulator for continual and private learning.

    from clsim import Experiment
    Experiment(scenario="split_digits", strategy="ewc", epochs=1).run()

The layers and the order in which a run is assembled: docs/architecture.md.
"""

__version__ = "0.1.0"


def __getattr__(name):   # `clsim.Experiment` without importing torch for `import clsim.errors`
    if name in ("Experiment", "Result"):
        from clsim import experiment
        return getattr(experiment, name)
    raise AttributeError(f"module 'clsim' has no attribute {name!r}")
