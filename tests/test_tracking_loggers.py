"""The W&B and MLflow loggers write what the run measured: each test reads back, with the tool's own
formats (W&B's offline transaction log, MLflow's file store through its client), the figures that
summary.json and log.jsonl hold; a resumed MLflow run ends with the metrics of an uninterrupted one."""
from __future__ import annotations

import json
import struct
import time

import pytest

from clsim import Experiment, rundir
from clsim.loggers import Logger

RUN = {"strategy": "ewc", "setting": "task_il", "epochs": 1, "n_tasks": 2, "seed": 1, "progress": False}


class CtrlC(Logger):
    """Presses Ctrl-C in the second task's second epoch (after the first checkpoint)."""
    writes_files = False

    def step(self, record):
        if record["task"] == 1 and record["epoch"] == 1:
            raise KeyboardInterrupt


def jsonl_steps(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "step"}


def wandb_records(path) -> list:
    """The records of a W&B offline transaction log (run-ID.wandb): a 7-byte header (':W&B', magic,
    version), then LevelDB's log format (32 KiB blocks; chunks of crc32, length, type, data; types
    1 full, 2 first, 3 middle, 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, buffer, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:                          # zero padding up to the block's end
            pos += block - pos % block
            continue
        buffer += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buffer)
            records.append(record)
            buffer = b""
    return records


def wandb_history(log) -> dict[int, dict]:
    """step -> the figures W&B logged at that step."""
    history = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    return history


@pytest.mark.slow
def test_wandb_offline_run_holds_every_step_loss_and_the_final_figures(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'clsim[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = Experiment(**RUN, loggers="jsonl,wandb", wandb_dir=str(tmp_path), out=str(tmp_path)).run()
    [log] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert log.name == f"run-{(result.run_dir / 'wandb_run_id').read_text().strip()}.wandb"
    history, config, summary = wandb_history(log), {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):   # the hparams come with the run record, later changes as config
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
    losses = {step: row["train/loss"] for step, row in history.items() if "train/loss" in row}
    assert losses == pytest.approx(jsonl_steps(result.run_dir))
    last = history[max(history)]
    assert last["summary/acc"] == pytest.approx(result.acc)
    assert [last[f"eval/acc_task_{j}"] for j in range(2)] == pytest.approx(result.summary["accuracy_matrix"][-1])
    assert config["strategy"] == "ewc" and config["seed"] == 1
    assert summary["acc"] == pytest.approx(result.acc)
    assert not [k for row in history.values() for k in row if k.startswith("privacy/")]   # no mechanism: no δ


@pytest.mark.slow
def test_an_interrupted_wandb_run_is_finished_as_failed(tmp_path, monkeypatch):
    """abort() ends the W&B run (exit code 1) when the run fails, not whenever the process exits."""
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'clsim[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(rundir.Interrupted):
        Experiment(**{**RUN, "epochs": 2}, loggers=["wandb", CtrlC], wandb_dir=str(tmp_path), out=str(tmp_path)).run()
    [log] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    waited = time.monotonic() + 30   # W&B's service writes the log after finish() returns
    while not (exits := [r.exit.exit_code for r in wandb_records(log) if r.WhichOneof("record_type") == "exit"]):
        if time.monotonic() > waited:
            break
        time.sleep(0.2)
    assert exits == [1]


def mlflow_metrics(run_dir) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("clsim").experiment_id])
    assert run.info.status == "FINISHED"
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}, run.data.params


@pytest.mark.slow
def test_mlflow_file_store_holds_every_step_loss_and_the_matrix(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'clsim[mlflow]')")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    result = Experiment(**RUN, loggers="jsonl,mlflow", out=str(tmp_path)).run()
    metrics, params = mlflow_metrics(result.run_dir)
    assert dict(metrics["train/loss"]) == pytest.approx(jsonl_steps(result.run_dir))
    assert [v for _, v in metrics["summary/acc"]][-1] == pytest.approx(result.acc)
    assert [metrics[f"eval/acc_task_{j}"][-1][1] for j in range(2)] == pytest.approx(result.summary["accuracy_matrix"][-1])
    assert params["strategy"] == "ewc" and params["seed"] == "1"
    assert not [k for k in metrics if k.startswith("privacy/")]   # no mechanism: no δ


@pytest.mark.slow
def test_an_interrupted_mlflow_run_on_a_tracking_store_fails_then_a_resume_finishes_it(tmp_path, monkeypatch):
    """abort() marks a run on a store outside the run directory FAILED (not RUNNING forever); the
    resumed run logs to the same MLflow run and ends it FINISHED."""
    pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'clsim[mlflow]')")
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri, run = (tmp_path / "store").as_uri(), {**RUN, "epochs": 2}
    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**run, loggers=["mlflow", CtrlC], mlflow_tracking_uri=uri, out=str(tmp_path)).run()
    run_id = (stopped.value.partial / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FAILED"
    resumed = Experiment(**run, loggers="mlflow", mlflow_tracking_uri=uri, out=str(tmp_path)).run(
        resume_dir=stopped.value.partial)
    assert (resumed.run_dir / "mlflow_run_id").read_text().strip() == run_id
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics["summary/acc"] == pytest.approx(resumed.acc)


@pytest.mark.slow
def test_a_resumed_mlflow_run_continues_the_same_run_to_the_same_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'clsim[mlflow]')")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = {**RUN, "epochs": 2}
    whole = Experiment(**run, loggers="mlflow", out=str(tmp_path / "whole")).run()
    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**run, loggers=["mlflow", CtrlC], out=str(tmp_path / "cut")).run()
    resumed = Experiment(**run, loggers="mlflow", out=str(tmp_path / "cut")).run(resume_dir=stopped.value.partial)
    expected, _ = mlflow_metrics(whole.run_dir)
    got, _ = mlflow_metrics(resumed.run_dir)
    assert sorted(got) == sorted(expected)
    for key in ("train/loss", "summary/acc", "eval/acc_task_0"):
        assert [s for s, _ in got[key]] == [s for s, _ in expected[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]]), key


@pytest.mark.slow
def test_a_resumed_wandb_run_logs_to_the_same_run_from_its_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'clsim[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = {**RUN, "epochs": 2, "wandb_dir": str(tmp_path)}
    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**run, loggers=["jsonl", "wandb", CtrlC], out=str(tmp_path / "cut")).run()
    resumed = Experiment(**run, loggers="jsonl,wandb", out=str(tmp_path / "cut")).run(resume_dir=stopped.value.partial)
    run_id = (resumed.run_dir / "wandb_run_id").read_text().strip()
    first, second = (wandb_history(log) for log in sorted(tmp_path.glob(f"wandb/offline-run-*/run-{run_id}.wandb")))
    steps = jsonl_steps(resumed.run_dir)
    checkpoint = min(second) - 1   # the resumed run starts after the first task's last step
    assert checkpoint == len(steps) // 2 and max(first) > checkpoint   # the interrupted run went past it
    logged = {s: row["train/loss"] for h in (first, second) for s, row in h.items() if "train/loss" in row}
    assert logged == pytest.approx(steps)
