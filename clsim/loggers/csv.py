"""CSV files for spreadsheets and pandas: steps, task records and the score matrix."""
from __future__ import annotations

import contextlib
import csv

from clsim.loggers import Logger, numbers
from clsim.registry import register_logger


@register_logger("csv")
class CsvLogger(Logger):
    """steps.csv and tasks.csv (long format: one row per figure) and matrix.csv (one row per task)."""

    def __init__(self, context, options=None):
        super().__init__(context, options)
        # Long format (step, task, epoch, name, value): figures that appear mid-run (a strategy's,
        # an RL episode return) need no change of header.
        self.files = {name: open(self.path(f"{name}.csv"), "a", newline="") for name in ("steps", "tasks", "matrix")}
        self.writers = {name: csv.writer(f) for name, f in self.files.items()}
        for name, header in (("steps", ["step", "task", "epoch", "name", "value"]),
                             ("tasks", ["task", "step", "name", "value"])):
            if self.files[name].tell() == 0:
                self.writers[name].writerow(header)

    def step(self, record):
        for name, value in numbers(record):
            if name not in ("step", "task", "epoch"):
                self.writers["steps"].writerow([record["step"], record["task"], record["epoch"], name, value])

    def task(self, record):
        i = record["task"]
        for name, value in numbers({k: v for k, v in self.figures_of(record).items() if k not in ("task", "step")}):
            self.writers["tasks"].writerow([i, record["step"], name, value])
        if self.files["matrix"].tell() == 0:
            self.writers["matrix"].writerow(["after_task", *(f"task_{j}" for j in range(len(record["row"])))])
        self.writers["matrix"].writerow([i, *record["row"]])
        self.flush()

    def flush(self):
        for f in self.files.values():
            f.flush()

    def abort(self):
        for f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()

    def close(self, summary):
        for f in self.files.values():
            f.close()
