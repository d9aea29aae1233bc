"""Data-parallel runs (clsim/distributed.py): 2 gloo processes on 127.0.0.1 give the 1-process
accuracy matrix for every strategy, every worker ends with the same weights and strategy state,
and --workers / torchrun / a killed worker behave as docs/distributed.md says."""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import queue
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clsim import Experiment
from clsim.registry import STRATEGIES
from conftest import REPO, read_summary

RUN = {"scenario": "split_digits", "epochs": 1, "n_tasks": 3, "hidden": "32", "lr": 0.1, "seed": 2,
       "progress": False, "loggers": [], "out": None}
CARTPOLE = {"scenario": "cartpole", "ppo_timesteps": 256, "ppo_epochs": 1, "batch_size": 128,
            "ppo_eval_episodes": 2, "cartpole_tasks": "default,swap", "seed": 2, "progress": False,
            "loggers": [], "out": None}
#: every registered strategy on split_digits, and PPO (rollouts split over the workers) with EWC and BLIP
CASES = {**{name: {**RUN, "strategy": name} for name in sorted(e.name for e in STRATEGIES.entries()
                                                               if "supervised" in e.target.learners)},
         "ppo-ewc": {**CARTPOLE, "strategy": "ewc"}, "ppo-blip": {**CARTPOLE, "strategy": "blip"}}
#: Tolerance: the workers sum their rows' gradients in another order than one process does, so
#: weights differ by float rounding (~1e-7 relative a step); an accuracy moves only if that flips
#: a test prediction. One flip in a task's ~36 test examples is 100/36 points.
TOLERANCE = 100 / 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, job, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # the group is ours: clsim joins it and leaves it to us to tear down, after a final barrier
    dist.init_process_group("gloo")
    results.put((rank, pickle.dumps(job(*args))))   # bytes: no shared-memory tensors to outlive us
    dist.barrier()
    dist.destroy_process_group()


def in_two_processes(job, *args) -> list:
    """[rank 0's, rank 1's] `job(*args)`, run by a group of 2 gloo processes on 127.0.0.1."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, job, args, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    while len(got) < len(procs):   # a worker that died says so instead of leaving us waiting
        try:
            rank, value = results.get(timeout=5)
            got[rank] = value
        except queue.Empty:
            assert all(p.is_alive() or p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [pickle.loads(got[0]), pickle.loads(got[1])]


def trained(options: dict) -> dict:
    """The accuracy matrix, the privacy report and a digest of the weights and strategy state."""
    experiment = Experiment(**options)
    parts = {}
    assemble = experiment._assemble
    experiment._assemble = lambda: parts.setdefault("p", assemble())
    summary = experiment.run().summary
    buffer = io.BytesIO()
    torch.save({"model": parts["p"].learner.model.state_dict(), "strategy": parts["p"].strategy.state_dict()}, buffer)
    return {"matrix": summary["accuracy_matrix"], "privacy": summary["privacy"],
            "digest": hashlib.sha256(buffer.getvalue()).hexdigest()}


def trained_all() -> dict:
    return {name: trained(options) for name, options in CASES.items()}


@pytest.fixture(scope="module")
def two_workers():
    return in_two_processes(trained_all)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_give_the_one_process_matrix_and_agree_on_every_weight(two_workers, case):
    torch.set_num_threads(1)
    one = trained(CASES[case])
    rank0, rank1 = (w[case] for w in two_workers)
    assert rank0["digest"] == rank1["digest"], "the workers' weights or strategy state differ"
    if CASES[case]["scenario"] == "cartpole":
        # Normalised returns have no useful tolerance: a rounding difference that flipped one
        # sampled action would change whole episodes. Both sides draw every action from the same
        # generator with the same probabilities up to rounding, so they are expected equal.
        assert one["matrix"] == rank0["matrix"]
    else:
        assert close(one["matrix"], rank0["matrix"]), (one["matrix"], rank0["matrix"])
    # the same accesses in the ledger, so the same ε (dpsgd, dplis: Poisson sampling over the whole
    # dataset, one release a step)
    assert rank0["privacy"] == one["privacy"]


@pytest.mark.slow
def test_dpsgd_on_two_workers_reports_the_epsilon_dp_accounting_gives(two_workers):
    from test_privacy_individuals import dp_accounting_epsilon
    report = two_workers[0]["dpsgd"]["privacy"]
    for dataset, entry in report["datasets"].items():
        assert entry["epsilon"] == pytest.approx(dp_accounting_epsilon(entry["accesses"], report["delta"]), rel=0.01)
        assert entry["accesses"][0]["steps"] > 0


def one_noisy_step(sigma: float) -> dict:
    """DP-SGD's first step on a worker: the clipped sum, and the private gradient (sum + noise) / B."""
    experiment = Experiment(**{**RUN, "strategy": "dpsgd", "noise_multiplier": sigma})
    parts = experiment.build()
    task, mechanism, learner = parts.scenario.tasks[0], parts.mechanism, parts.learner
    mechanism.before_task(task, learner.make_optimizer())
    batch = next(b for b in mechanism.batches(task, 0, None) if b is not None)
    mechanism.backward(learner.forward(batch)[0], None)
    B = mechanism.plans[task.dataset_id].expected_batch
    return {n: p.grad.clone() * B for n, p in learner.model.named_parameters() if p.grad is not None}


def noisy_and_clean() -> tuple[dict, dict]:
    return one_noisy_step(2.0), one_noisy_step(0.0)


@pytest.mark.slow
def test_dpsgd_on_two_workers_adds_the_noise_once_with_total_std_sigma_c():
    """The private gradient minus the clipped sum is one draw of N(0, σ²C²) per coordinate, the
    same on both workers: not N draws (std σC·√N), not none."""
    (noisy0, clean0), (noisy1, clean1) = in_two_processes(noisy_and_clean)
    C = Experiment(**{**RUN, "strategy": "dpsgd"}).mechanism_options.max_grad_norm
    noise = torch.cat([(noisy0[n] - clean0[n]).flatten() for n in noisy0])
    assert all(torch.equal(noisy0[n], noisy1[n]) and torch.equal(clean0[n], clean1[n]) for n in noisy0)
    assert noise.numel() > 2000
    assert noise.std().item() == pytest.approx(2.0 * C, rel=0.05)
    assert abs(noise.mean().item()) < 4 * 2.0 * C / noise.numel() ** 0.5


# ---------------------------------------------------------------- launchers, one writer, a killed worker

CLI = ["--strategy", "ewc", "--setting", "task_il", "--epochs", "1", "--n-tasks", "3", "--hidden", "32",
       "--lr", "0.1", "--seed", "2", "--progress", "false", "--loggers", "jsonl"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, out, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_scenario.py"), *args, "--out", str(out)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=900, **kwargs)


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, str(REPO / "run_scenario.py")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = cli(*CLI, out=out)
    assert done.returncode == 0, done.stderr
    return read_summary(out)


@pytest.mark.slow
def test_workers_flag_and_torchrun_on_one_machine_give_the_one_process_figures_and_one_directory(tmp_path,
                                                                                              one_process):
    flag = cli(*CLI, "--workers", "2", out=tmp_path / "flag")
    assert flag.returncode == 0, flag.stderr
    port = str(free_port())
    run = subprocess.run(torchrun("--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                  "--master-port", port) + CLI + ["--out", str(tmp_path / "torchrun")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    for out in (tmp_path / "flag", tmp_path / "torchrun"):
        assert len(list(out.iterdir())) == 1   # rank 0 alone wrote a run directory
        summary = read_summary(out)
        assert close(summary["accuracy_matrix"], one_process["accuracy_matrix"])
        assert summary["steps"] == one_process["steps"]   # the global batch, split: as many steps


@pytest.mark.slow
def test_two_machines_of_one_process_each_give_the_one_process_figures(tmp_path, one_process):
    """The multi-node example of docs/distributed.md, both 'nodes' on 127.0.0.1."""
    port = str(free_port())
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--node-rank", str(k), "--nproc-per-node", "1",
                                       "--master-addr", "127.0.0.1", "--master-port", port)
                              + CLI + ["--out", str(tmp_path / "out")],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    # both nodes' pipes drained at once (one waiting on a full pipe would stall the other at torchrun's
    # exit barrier), and a failure shows what every node said
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        said = list(pool.map(lambda node: node.communicate(timeout=900)[1], nodes))
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(f"node {k}: {err}" for k, err in enumerate(said))
    assert close(read_summary(tmp_path / "out")["accuracy_matrix"], one_process["accuracy_matrix"])


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_in_one_line_and_the_run_resumes(tmp_path, one_process):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "run_scenario.py"), *CLI, "--workers", "2",
                             "--out", str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = out / ".split_digits-ewc-task_il-seed2.partial"
    while proc.poll() is None and not (partial / "checkpoint.pt").is_file():
        time.sleep(0.05)
    workers = [pid for pid in descendants(proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)   # one of them (started second: rank 1, most likely)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    stopped = time.monotonic() - killed
    if not partial.exists():
        pytest.skip("the run ended before the kill on this machine")
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert re.fullmatch(rf"error: worker [01] \(killed by SIGKILL\) stopped the run; the run so far is kept in "
                        rf"{re.escape(str(partial))}; continue with: python run_scenario.py --resume "
                        rf"{re.escape(str(partial))}", lines[0]), lines[0]
    assert stopped < 30, stopped
    # finished on one process: a checkpoint is the same whatever number of workers wrote it
    done = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), "--resume", str(partial), "--workers", "1"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert close(read_summary(out)["accuracy_matrix"], one_process["accuracy_matrix"])


@pytest.mark.slow
def test_a_run_started_on_one_process_resumes_on_two_workers(tmp_path, one_process):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "run_scenario.py"), *CLI, "--out", str(out)], cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = out / ".split_digits-ewc-task_il-seed2.partial"
    while proc.poll() is None and not (partial / "checkpoint.pt").is_file():
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    if not partial.exists():
        pytest.skip("the run ended before the kill on this machine")
    done = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), "--resume", str(partial), "--workers", "2"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    summary = read_summary(out)
    assert close(summary["accuracy_matrix"], one_process["accuracy_matrix"]) and summary["steps"] == one_process["steps"]


@pytest.mark.slow
def test_workers_refuse_replay_under_a_privacy_mechanism_in_one_line(tmp_path):
    done = cli("--strategy", "er", "--privacy", "dpsgd", "--epochs", "1", "--workers", "2", out=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "which --privacy dpsgd does not split over workers" in done.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def close(a, b) -> bool:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) <= TOLERANCE


def descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *descendants(int(child))]
    return out


@pytest.mark.slow
def test_address_runs_the_workers_through_ray_train_on_a_local_cluster(tmp_path, one_process):
    pytest.importorskip("ray.train")
    done = cli(*CLI, "--workers", "2", "--address", "local", out=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list(tmp_path.iterdir())) == 1
    assert close(read_summary(tmp_path)["accuracy_matrix"], one_process["accuracy_matrix"])


@pytest.mark.slow
def test_address_runs_the_workers_on_two_nodes_of_a_ray_cluster(tmp_path, one_process):
    """A Ray cluster of a head with no CPU and two nodes of one CPU each (three raylets on
    127.0.0.1): one worker on each node, neither on the head, where the command runs. Rank 0's
    result comes back through Ray (not a Ray Train checkpoint, which would lie on rank 0's node)."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    pytest.importorskip("ray.train")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        done = cli(*CLI, "--workers", "2", "--address", cluster.address, out=tmp_path)
    finally:
        cluster.shutdown()
    assert done.returncode == 0, done.stderr
    assert close(read_summary(tmp_path)["accuracy_matrix"], one_process["accuracy_matrix"])


@pytest.mark.slow
def test_a_sweep_trial_with_two_workers_runs_them_through_ray_train_and_gives_the_one_process_figures(tmp_path,
                                                                                                      one_process):
    """A trial of `workers: 2` on the sweep's local Ray: its 2 workers are Ray Train's (the run
    recorded address auto: the sweep's cluster) and the trial reserves no CPU of its own, so the
    2-CPU local Ray holds both workers."""
    pytest.importorskip("ray.train")
    (tmp_path / "spec.yaml").write_text(
        "name: dp\nbase: {strategy: ewc, setting: task_il, epochs: 1, n_tasks: 3, hidden: '32', lr: 0.1, seed: 2, "
        "loggers: [jsonl], workers: 2}\n")
    done = subprocess.run([sys.executable, "-m", "clsim", "sweep", "spec.yaml", "--out", "out", "--workers", "2",
                           "--no-report"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "out" / "dp" / "trials").glob("*/*/summary.json")
    config = json.loads((run.parent / "config.json").read_text())
    assert (config["run"]["workers"], config["run"]["address"]) == (2, "auto")
    assert close(json.loads(run.read_text())["accuracy_matrix"], one_process["accuracy_matrix"])
