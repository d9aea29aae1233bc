"""The console during a run: a header, progress, one line per finished task (clsim/console.py)."""
from __future__ import annotations

import sys
import time

from clsim import console
from clsim.loggers import Logger


class ProgressLogger(Logger):
    """A header line saying what runs; then a progress bar on a terminal or, off one (a cluster
    job's log, a pipe), a plain line every `plain_every` seconds; and one line per finished task,
    with ε under a privacy mechanism. `--progress` unset: the bar only when stderr is a terminal;
    true: the bar wherever; false: nothing at all. Always present (not one of --loggers); writes
    no files. The total is the sum of the planned steps of each task, rescaled after every task by
    the steps it really took (a strategy such as joint takes more), so the time left stays honest."""

    writes_files = False
    plain_every = 30.0   # seconds between plain progress lines

    def __init__(self, context, options=None):
        super().__init__(context, options)
        from tqdm import tqdm
        enabled = context.progress
        self.silent = enabled is False
        bar = bool(enabled) or (enabled is None and sys.stderr.isatty())
        self.plain = not self.silent and not bar
        self.planned = list(context.planned_steps or [])
        self.done = context.resume_step or 0
        self.total = sum(self.planned)
        self.bar = tqdm(total=self.total or None, initial=self.done, disable=not bar, unit="step", dynamic_ncols=True)
        self.last_line = time.monotonic()
        self.first = None   # (time, steps done) at the first step: the rate leaves set-up out
        if not self.silent:
            self._say(console.header(context.hparams, len(self.planned), context.device, context.destination,
                                     context.resume_step))

    def _say(self, line: str) -> None:
        self.bar.write(line)   # above the bar, on stdout
        sys.stdout.flush()     # a pipe's buffer would hold the line back

    def step(self, record):
        self.bar.update(1)
        self.done += 1
        if record["step"] % 20 == 0 and "loss" in record:   # no loss under a privacy mechanism
            self.bar.set_postfix(task=record["task"], loss=f"{record['loss']:.3f}", refresh=False)
        now = time.monotonic()
        self.first = self.first or (now, self.done)
        if self.plain and now - self.last_line >= self.plain_every:
            self.last_line = now
            self._say(self._progress_line(record, now))

    def _progress_line(self, record, now: float) -> str:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = (f"step {self.done}/{self.total or '?'}{share} | task {record['task'] + 1}/{len(self.planned)} "
                f"epoch {record['epoch'] + 1}")
        rate = (self.done - self.first[1]) / max(now - self.first[0], 1e-9)
        if rate > 0:
            line += f" | {rate:.3g} steps/s"
            if self.total > self.done:
                left = (self.total - self.done) / rate
                line += f" | about {left / 60:.0f} min left" if left >= 90 else f" | about {left:.0f} s left"
        return line

    def task(self, record):
        done = record["task"] + 1
        if self.planned and done < len(self.planned):
            ratio = record["step"] / max(1, sum(self.planned[:done]))
            self.total = self.bar.total = record["step"] + round(ratio * sum(self.planned[done:]))
            self.bar.refresh()
        if not self.silent:
            aware = record.get("task_aware")
            self._say(f"task {record['task']}: ACC {record['acc']:.2f}  BWT {record['bwt']:.2f}  "
                      + row_text(record)
                      + ("" if aware is None else f"  task-aware ACC {aware['acc']:.2f}")
                      + (f"  {console.epsilon(record['privacy'])}" if self.context.private else ""))

    def abort(self):
        self.bar.close()

    def close(self, summary):
        self.bar.close()


def row_text(record: dict) -> str:
    """The task's row of scores; for RL the raw returns first, with the scores beside them (a
    success rate for SAC, normalised returns for PPO)."""
    row, details = record["row"], record.get("details", {})
    returns = details.get("return_raw")
    if returns is None:
        return f"row {' '.join(f'{x:.1f}' for x in row)}"
    name = "success" if details.get("success_rate") == row else "normalised"
    return f"returns {' '.join(f'{x:.1f}' for x in returns)} ({name} {' '.join(f'{x:.2f}' for x in row)})"
