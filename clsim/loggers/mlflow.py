"""MLflow: step and task figures as an MLflow run, in a file store under the run directory by default.

Install with `pip install 'clsim[mlflow]'`. The default store is `mlruns/` in the run directory (MLflow's
file store, which MLflow ≥ 3 keeps in maintenance mode: this logger opts in, for its process, with
MLFLOW_ALLOW_FILE_STORE); `--mlflow-tracking-uri` points it at a server or a database instead. In the
file store every metric is a file appended line by line, so a resumed run, which cuts the claimed
`mlruns/` back to its checkpoint, continues the same MLflow run (its id is kept in the run
directory, `mlflow_run_id`) as an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from clsim.config import opt
from clsim.errors import UserError
from clsim.loggers import Logger, step_figures, task_figures
from clsim.registry import register_logger

@register_logger("mlflow")
class MlflowLogger(Logger):
    """MLflow run (local file store by default): hparams as params, step and task figures as metrics."""

    @dataclass
    class Options:
        mlflow_tracking_uri: str = opt("", "MLflow tracking URI (default: a file store, mlruns/ in the run directory)")
        mlflow_experiment: str = opt("clsim", "MLflow experiment name")

    def __init__(self, context, options=None):
        super().__init__(context, options)
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("--loggers mlflow needs MLflow: pip install 'clsim[mlflow]'") from None
        options = options or self.Options()
        uri = options.mlflow_tracking_uri
        self.own_store = not uri
        if self.own_store:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = self.path("mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(options.mlflow_experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(options.mlflow_experiment)
        id_file = self.path("mlflow_run_id")
        if context.resume_step is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            name = context.run_dir.name.strip(".").removesuffix(".partial")
            self.run_id = self.client.create_run(experiment, run_name=name).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in context.hparams.items()])
            id_file.write_text(self.run_id + "\n")
        self.pending = []

    def _log(self, figures: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in figures.items()]

    def step(self, record):
        self._log(step_figures(record), record["step"])
        if len(self.pending) >= 1000:   # MLflow's batch limit
            self.flush()

    def task(self, record):
        self._log(task_figures(self.figures_of(record)), record["step"])
        self.flush()

    def flush(self):
        for start in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending = []

    def abort(self):
        """End the MLflow run as FAILED where it outlives the run directory (a tracking server, or a store
        elsewhere), so that it does not show as running forever; a resumed run logs to it again and
        ends it FINISHED. The default store inside the run directory goes with it, or is cut back to
        the checkpoint and continued by a resume, so its files stay as they are."""
        if self.own_store:
            return
        with contextlib.suppress(Exception):   # MLflow's own failure (a server gone) must not mask the run's
            self.client.set_terminated(self.run_id, status="FAILED")

    def close(self, summary):
        self.flush()
        self.client.set_terminated(self.run_id)
