"""Loggers: observers of the engine's records, chosen by name (`--loggers tensorboard,jsonl,csv`).

A logger is one file: a `Logger` subclass registered with `@register_logger("name")`; third-party
packages register theirs through the entry-point group `clsim.loggers`. A logger has step(record),
task(record), close(summary) and abort() (none changes training), and writes only under paths it claims
with `self.path(name)` in its run directory, appending. That handles resuming once for every
logger: at each checkpoint the run directory (clsim/rundir.py) records the sizes of the claimed
files (`file_sizes`), and a resumed run cuts them back to those sizes, dropping what an
interrupted run wrote after its last checkpoint, before the loggers reopen them. See
docs/architecture.md ("Loggers").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class LogContext:
    """What a logger is made with."""
    run_dir: Path | None            # None: the run writes no files
    hparams: dict                   # scenario, strategy, seed, options: the hparams table
    score_scale: float = 100.0      # a perfect score: 100 (accuracy in %), 1 (normalised returns)
    progress: bool | None = None    # --progress
    resume_step: int | None = None  # a resumed run: the last step its checkpoint covers
    planned_steps: list[int] | None = None   # the expected steps of each task (the learner's plan)
    device: str = "cpu"             # --device
    destination: Path | None = None   # where the finished run will be (run_dir is its hidden .partial)

    @property
    def private(self) -> bool:
        """Whether the run trains under a privacy mechanism (only then has its ε a meaning)."""
        return self.hparams.get("privacy", "none") != "none"


class Logger:
    """Base class: override step, task and close as needed; claim output paths with `path`."""

    #: a logger that writes files cannot run without a run directory (out=None)
    writes_files = True

    def __init__(self, context: LogContext, options=None):
        self.context, self.options = context, options
        self._claimed: list[Path] = []

    def path(self, name: str) -> Path:
        """Claim a file or directory of this logger under the run directory (open files for
        appending: a resumed run continues them, cut back to its checkpoint by clsim/rundir.py)."""
        path = self.context.run_dir / name
        self._claimed.append(path)
        return path

    def step(self, record: dict) -> None:
        pass

    def task(self, record: dict) -> None:
        pass

    def flush(self) -> None:
        """Push buffered output to the claimed files (called before their sizes are saved)."""

    def close(self, summary: dict) -> None:
        pass

    def figures_of(self, record: dict) -> dict:
        """A task record less its privacy section where the run trains under no mechanism: there δ and
        ε mean nothing (TensorBoard logs no privacy/* either)."""
        return record if self.context.private else {k: v for k, v in record.items() if k != "privacy"}

    def abort(self) -> None:
        """The run failed: release open files and threads now (the run directory is removed or
        kept next), writing no summary. Must not raise."""

    def file_sizes(self) -> dict[str, int]:
        """Claimed file (relative to the run directory) -> size, for the checkpoint."""
        self.flush()
        return {str(f.relative_to(self.context.run_dir)): f.stat().st_size
                for path in self._claimed for f in _files(path)}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def numbers(d: dict, prefix: str = ""):
    """Flatten nested dicts into (tag, number) pairs; skips lists, tensors and None."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from numbers(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield prefix + k, v


def to_json(value):
    """JSON-safe copy: tensors become lists, non-finite floats become None."""
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_json(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


#: a record's bookkeeping, not a figure
SKIP = ("step", "task", "epoch", "row")


def finite(pairs) -> dict:
    """name -> value for the finite numbers among (name, value) pairs (ε = ∞ is not a figure)."""
    return {name: value for name, value in pairs if math.isfinite(value)}


def step_figures(record: dict) -> dict:
    """A step record as flat figures, named as TensorBoard's (`train/loss`, `privacy/epsilon`)."""
    return finite((k if "/" in k else f"train/{k}", v) for k, v in numbers(record) if k not in SKIP)


def task_figures(record: dict) -> dict:
    """A task record as flat figures: `eval/acc_task_j`, `summary/acc` (bwt, fwt, forgetting;
    class_il also `summary_task_aware/*`), then memory, time, privacy and strategy figures."""
    figures = {f"eval/acc_task_{j}": score for j, score in enumerate(record["row"])}
    for key in ("acc", "bwt", "fwt", "forgetting"):
        figures[f"summary/{key}"] = record[key]
    if record.get("task_aware"):
        figures.update({f"summary_task_aware/{k}": record["task_aware"][k] for k in ("acc", "bwt", "forgetting")})
    rest = {k: v for k, v in record.items() if k not in (*SKIP, "acc", "bwt", "fwt", "forgetting", "task_aware")}
    return finite([*figures.items(), *numbers(rest)])
