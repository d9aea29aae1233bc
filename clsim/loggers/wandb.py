"""Weights & Biases: step and task figures as a W&B run (offline by default; `wandb sync` uploads).

Install with `pip install 'clsim[wandb]'`. W&B keeps its files where it always does (`wandb/` in
the current directory, or `--wandb-dir`), not in the run directory: W&B writes them from its own
process, so they could not be cut back to a checkpoint as the other loggers' files are. The run
directory keeps the W&B run id (`wandb_run_id`), and a resumed run logs to that same W&B run from
its checkpoint's step on; the interrupted process's own W&B files stay as they were (with the steps
it logged after the checkpoint, which the resumed run logs again).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from clsim.config import opt
from clsim.errors import UserError
from clsim.loggers import Logger, finite, numbers, step_figures, task_figures
from clsim.registry import register_logger

#: run directory -> its W&B run while open: a run interrupted in this process (a notebook, a test)
#: never reached close(), and W&B refuses to reopen an id still in use
_OPEN: dict = {}


@register_logger("wandb")
class WandbLogger(Logger):
    """Weights & Biases run (offline by default): hparams as config, step and task figures, summary."""

    @dataclass
    class Options:
        wandb_project: str = opt("clsim", "W&B project name")
        wandb_mode: str = opt("offline", "offline (files only; `wandb sync` uploads them) or online",
                              choices=("offline", "online"))
        wandb_dir: str = opt("", "directory for W&B's files (default: W&B's own, wandb/ in the current directory)")

    def __init__(self, context, options=None):
        super().__init__(context, options)
        try:
            import wandb
        except ImportError:
            raise UserError("--loggers wandb needs W&B: pip install 'clsim[wandb]'") from None
        options = options or self.Options()
        id_file = self.path("wandb_run_id")
        resumed = context.resume_step is not None and id_file.is_file()
        if str(context.run_dir) in _OPEN:
            _OPEN.pop(str(context.run_dir)).finish(exit_code=1)
        self.run = wandb.init(project=options.wandb_project, mode=options.wandb_mode, dir=options.wandb_dir or None,
                              name=context.run_dir.name.strip(".").removesuffix(".partial"),
                              config=context.hparams, id=id_file.read_text().strip() if resumed else None,
                              resume="allow" if resumed else None,
                              reinit="create_new", settings=wandb.Settings(console="off", x_disable_stats=True,
                                                                           silent=True))
        _OPEN[str(context.run_dir)] = self.run
        id_file.write_text(self.run.id + "\n")

    def step(self, record):
        self.run.log(step_figures(record), step=record["step"])

    def task(self, record):
        self.run.log(task_figures(self.figures_of(record)), step=record["step"])

    def abort(self):
        """Finish the W&B run as failed (exit code 1), stopping its threads and its service's work on it
        now; a resumed run reopens it by id (resume="allow")."""
        _OPEN.pop(str(self.context.run_dir), None)
        with contextlib.suppress(Exception):   # W&B's own failure must not mask the run's
            self.run.finish(exit_code=1)

    def close(self, summary):
        self.run.summary.update(finite(numbers({k: summary[k] for k in ("acc", "bwt", "fwt", "forgetting")})))
        if self.context.private and summary.get("privacy", {}).get("epsilon_worst") is not None:
            self.run.summary["privacy/epsilon_worst"] = summary["privacy"]["epsilon_worst"]
        self.run.finish()
        _OPEN.pop(str(self.context.run_dir), None)
