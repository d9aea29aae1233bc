"""Observers of the engine's records: TensorBoard, a JSONL file, a progress bar.

Each logger has step(record), task(record) and close(summary); none changes training.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time

import numpy as np
import torch


def _numbers(d: dict, prefix: str = ""):
    """Flatten nested dicts into (tag, number) pairs; skips lists, tensors and None."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}/")
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


class JsonlLogger:
    """One JSON line per record, flushed at every task record (the run directory's checkpoint,
    written after it, records how much of the file it covers). A resumed run appends to the log
    its run directory has cut back to the checkpoint."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = path
        self.file = open(path, "w" if resume_step is None else "a")

    def _write(self, kind, record, flush=False):
        try:
            self.file.write(json.dumps({"kind": kind, **to_json(record)}) + "\n")
            if flush:
                self.file.flush()
        except OSError as exc:   # name the file: a full disk is reported with its path
            with contextlib.suppress(OSError):
                self.file.close()   # closed now, or the failed buffer is written again at exit
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def step(self, record):
        self._write("step", record)

    def task(self, record):
        self._write("task", record, flush=True)

    def close(self, summary):
        self.file.close()


class TensorBoardLogger:
    """Tags: train/*, eval/acc_task_j, summary/*, memory/*, time/*, privacy/*, strategy/*."""

    STEP_KEYS = ("loss", "lr", "examples_seen", "steps_per_sec")

    def __init__(self, log_dir, hparams: dict, resume_step: int | None = None, score_scale: float = 100.0):
        from torch.utils.tensorboard import SummaryWriter
        # On resume, TensorBoard discards events an interrupted run wrote after its checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir),
                                    purge_step=None if resume_step is None else resume_step + 1)
        self.hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                        for k, v in hparams.items()}
        self.last = None
        self.score_scale = score_scale

    def step(self, record):
        s, w = record["step"], self.writer
        now = time.perf_counter()
        if self.last is not None:
            w.add_scalar("train/steps_per_sec", (s - self.last[0]) / max(now - self.last[1], 1e-9), s)
        self.last = (s, now)
        for key, value in record.items():
            if key in ("step", "task", "epoch", "wall_time"):
                continue
            if key.startswith("privacy/") or key.startswith("strategy/"):
                w.add_scalar(key, value, s)
            elif isinstance(value, (int, float)):
                w.add_scalar(f"train/{key}", value, s)

    def task(self, record):
        w, i = self.writer, record["task"]
        for j, score in enumerate(record["row"]):
            w.add_scalar(f"eval/acc_task_{j}", score, i)
        for name, row in record.get("details", {}).items():
            for j, value in enumerate(row):
                w.add_scalar(f"eval/{name}_task_{j}", value, i)
        for key, tag in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting")):
            w.add_scalar(f"summary/{tag}", record[key], i)
        for tag, value in _numbers(record["memory"], "memory/"):
            w.add_scalar(tag, value, i)
        for tag, value in _numbers(record["wall_time"], "time/"):
            w.add_scalar(tag, value, i)
        for key, value in record["strategy"].items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                w.add_histogram(f"strategy/{key}", value, i)
            elif isinstance(value, (int, float, torch.Tensor)):
                w.add_scalar(f"strategy/{key}", float(value), i)
        privacy = record["privacy"]
        if privacy.get("datasets"):
            eps = privacy["epsilon_worst"]
            w.add_scalar("privacy/epsilon", float("inf") if eps is None else eps, i)
            for name, d in privacy["datasets"].items():
                w.add_scalar(f"privacy/epsilon_{name}", float("inf") if d["epsilon"] is None else d["epsilon"], i)

    def close(self, summary):
        R = summary["accuracy_matrix"]
        from clsim.report import figure_rgb, heatmap_figure
        self.writer.add_image("summary/accuracy_matrix", figure_rgb(heatmap_figure(R, self.score_scale)),
                              len(R) - 1, dataformats="HWC")
        metrics = {f"hparam/{k}": summary[k] for k in ("acc", "bwt", "fwt", "forgetting")}
        self.writer.add_hparams(self.hparams, metrics, run_name=".")
        self.writer.close()


class ProgressLogger:
    """A progress bar on a terminal and one line per finished task. `enabled` None: the bar only
    when stderr is a terminal (quiet in CI), task lines always; False: nothing at all.
    `planned`: the expected steps of each task (the learner's plan); the bar's total is their sum,
    rescaled after every task by the steps it really took (a strategy such as joint takes more),
    so tqdm's time left stays honest."""

    def __init__(self, planned: list[int] | None, enabled: bool | None = None, resume_step: int | None = None):
        from tqdm import tqdm
        self.silent = enabled is False
        self.planned = list(planned or [])
        self.bar = tqdm(total=sum(self.planned) or None, initial=resume_step or 0,
                        disable=not (enabled or (enabled is None and sys.stderr.isatty())),
                        unit="step", dynamic_ncols=True)

    def step(self, record):
        self.bar.update(1)
        if record["step"] % 20 == 0:
            self.bar.set_postfix(task=record["task"], loss=f"{record['loss']:.3f}", refresh=False)

    def task(self, record):
        done = record["task"] + 1
        if self.planned and done < len(self.planned):
            ratio = record["step"] / max(1, sum(self.planned[:done]))
            self.bar.total = record["step"] + round(ratio * sum(self.planned[done:]))
            self.bar.refresh()
        if not self.silent:
            self.bar.write(f"task {record['task']}: ACC {record['acc']:.2f}  BWT {record['bwt']:.2f}  "
                           f"row {' '.join(f'{x:.1f}' for x in record['row'])}")

    def close(self, summary):
        self.bar.close()
