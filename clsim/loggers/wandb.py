"""Weights & Biases: step and task figures as a W&B run (offline by default; `wandb sync` uploads).

Install with `pip install 'clsim[wandb]'`. The W&B files live under the run directory (`wandb/`);
W&B writes them from its own process, so they are not cut back on a resume as the claimed files
of the other loggers are: a resumed run logs to the same W&B run id (`resume="allow"`) from its
checkpoint's step on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from clsim.config import opt
from clsim.errors import UserError
from clsim.loggers import Logger, numbers
from clsim.registry import register_logger

SKIP = ("step", "task", "epoch", "row")


def finite(pairs) -> dict:
    """name -> value for the finite numbers among (name, value) pairs (ε = ∞ is not a figure)."""
    return {name: value for name, value in pairs if math.isfinite(value)}


def task_figures(record: dict) -> dict:
    """A task record as flat figures: accuracy per task, ACC/BWT/FWT/forgetting, memory, time,
    privacy, strategy figures (the TensorBoard logger's names)."""
    figures = {f"eval/acc_task_{j}": score for j, score in enumerate(record["row"])}
    for key in ("acc", "bwt", "fwt", "forgetting"):
        figures[f"summary/{key}"] = record[key]
    if record.get("task_aware"):
        figures.update({f"summary_task_aware/{k}": record["task_aware"][k] for k in ("acc", "bwt", "forgetting")})
    rest = {k: v for k, v in record.items() if k not in (*SKIP, "acc", "bwt", "fwt", "forgetting", "task_aware")}
    return finite([*figures.items(), *numbers(rest)])


@register_logger("wandb")
class WandbLogger(Logger):
    """Weights & Biases run (offline by default): hparams as config, step and task figures, summary."""

    @dataclass
    class Options:
        wandb_project: str = opt("clsim", "W&B project name")
        wandb_mode: str = opt("offline", "offline (files under the run directory, `wandb sync` uploads them) "
                              "or online", choices=("offline", "online"))

    def __init__(self, context, options=None):
        super().__init__(context, options)
        try:
            import wandb
        except ImportError:
            raise UserError("--loggers wandb needs W&B: pip install 'clsim[wandb]'") from None
        options = options or self.Options()
        resumed = sorted(context.run_dir.glob("wandb/*run-*-*")) if context.resume_step is not None else []
        self.run = wandb.init(project=options.wandb_project, mode=options.wandb_mode, dir=str(context.run_dir),
                              name=context.run_dir.name.strip(".").removesuffix(".partial"),
                              config=context.hparams, reinit="create_new",
                              id=resumed[0].name.rsplit("-", 1)[1] if resumed else None,
                              resume="allow" if resumed else None,
                              settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))

    def step(self, record):
        figures = finite((f"train/{k}" if "/" not in k else k, v) for k, v in numbers(record) if k not in SKIP)
        self.run.log(figures, step=record["step"])

    def task(self, record):
        self.run.log(task_figures(record), step=record["step"])

    def close(self, summary):
        self.run.summary.update(finite(numbers({k: summary[k] for k in ("acc", "bwt", "fwt", "forgetting")})))
        if summary.get("privacy", {}).get("epsilon_worst") is not None:
            self.run.summary["privacy/epsilon_worst"] = summary["privacy"]["epsilon_worst"]
        self.run.finish()
