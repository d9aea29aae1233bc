"""The progress bar and one line per finished task on stderr."""
from __future__ import annotations

import sys

from clsim.loggers import Logger


class ProgressLogger(Logger):
    """A progress bar on a terminal and one line per finished task. `--progress` unset: the bar
    only when stderr is a terminal (quiet in CI), task lines always; false: nothing at all.
    Always present (not one of --loggers); writes no files. The bar's total is the sum of the
    planned steps of each task, rescaled after every task by the steps it really took (a strategy
    such as joint takes more), so tqdm's time left stays honest."""

    writes_files = False

    def __init__(self, context, options=None):
        super().__init__(context, options)
        from tqdm import tqdm
        enabled = context.progress
        self.silent = enabled is False
        self.planned = list(context.planned_steps or [])
        self.bar = tqdm(total=sum(self.planned) or None, initial=context.resume_step or 0,
                        disable=not (enabled or (enabled is None and sys.stderr.isatty())),
                        unit="step", dynamic_ncols=True)

    def step(self, record):
        self.bar.update(1)
        if record["step"] % 20 == 0 and "loss" in record:   # no loss under a privacy mechanism
            self.bar.set_postfix(task=record["task"], loss=f"{record['loss']:.3f}", refresh=False)

    def task(self, record):
        done = record["task"] + 1
        if self.planned and done < len(self.planned):
            ratio = record["step"] / max(1, sum(self.planned[:done]))
            self.bar.total = record["step"] + round(ratio * sum(self.planned[done:]))
            self.bar.refresh()
        if not self.silent:
            aware = record.get("task_aware")
            self.bar.write(f"task {record['task']}: ACC {record['acc']:.2f}  BWT {record['bwt']:.2f}  "
                           f"row {' '.join(f'{x:.1f}' for x in record['row'])}"
                           + ("" if aware is None else f"  task-aware ACC {aware['acc']:.2f}"))

    def abort(self):
        self.bar.close()

    def close(self, summary):
        self.bar.close()
