"""TensorBoard: scalars per step and per task, the matrix as an image, the hparams table."""
from __future__ import annotations

import contextlib
import time

import torch

from clsim.loggers import Logger, numbers
from clsim.registry import register_logger


@register_logger("tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files under tb/: train/*, eval/*, summary/*, memory/*, time/*, privacy/*, strategy/*;
    class_il runs also eval_task_aware/* and summary_task_aware/* (the task-aware figures)."""

    def __init__(self, context, options=None):
        super().__init__(context, options)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.path("tb")))
        self.hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                        for k, v in context.hparams.items()}
        self.last = None

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
        for name, row in record.get("details", {}).items():
            for j, value in enumerate(row):
                w.add_scalar(f"eval/{name}_task_{j}", value, i)
        for point in record.get("evaluation_curve", []):   # SAC's evaluations while training, by env step
            for j, value in enumerate(point["success_rate"]):
                w.add_scalar(f"eval_curve/success_task_{j}", value, point["env_steps"])
        for suffix, figures in (("", record), ("_task_aware", record.get("task_aware"))):
            if figures is None:   # only class_il runs have task-aware figures
                continue
            for j, score in enumerate(figures["row"]):
                w.add_scalar(f"eval{suffix}/acc_task_{j}", score, i)
            for key, tag in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting")):
                w.add_scalar(f"summary{suffix}/{tag}", figures[key], i)
        for tag, value in numbers(record["memory"], "memory/"):
            w.add_scalar(tag, value, i)
        for tag, value in numbers(record["wall_time"], "time/"):
            w.add_scalar(tag, value, i)
        for key, value in record["strategy"].items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                w.add_histogram(f"strategy/{key}", value, i)
            elif isinstance(value, (int, float, torch.Tensor)):
                w.add_scalar(f"strategy/{key}", float(value), i)
        privacy = record["privacy"]
        if privacy.get("datasets") and self.context.private:   # ε only under a mechanism
            eps = privacy["epsilon_worst"]
            w.add_scalar("privacy/epsilon", float("inf") if eps is None else eps, i)
            for name, d in privacy["datasets"].items():
                w.add_scalar(f"privacy/epsilon_{name}", float("inf") if d["epsilon"] is None else d["epsilon"], i)

    def flush(self):
        self.writer.flush()

    def abort(self):
        with contextlib.suppress(OSError):   # e.g. the full disk that stopped the run
            self.writer.close()   # joins the writer thread, which would write into a removed directory

    def close(self, summary):
        R = summary["accuracy_matrix"]
        from clsim.report import figure_rgb, heatmap_figure
        self.writer.add_image("summary/accuracy_matrix", figure_rgb(heatmap_figure(R, self.context.score_scale)),
                              len(R) - 1, dataformats="HWC")
        success = summary.get("score_details", {}).get("success_rate", {}).get("matrix")
        if success:   # RL tasks with a success criterion (Continual World's figure)
            self.writer.add_image("summary/success_rate_matrix",
                                  figure_rgb(heatmap_figure(success, 1.0, "success-rate matrix")),
                                  len(R) - 1, dataformats="HWC")
        metrics = {f"hparam/{k}": summary[k] for k in ("acc", "bwt", "fwt", "forgetting")}
        if "task_aware" in summary:
            metrics["hparam/task_aware_acc"] = summary["task_aware"]["acc"]
        self.writer.add_hparams(self.hparams, metrics, run_name=".")
        self.writer.close()
