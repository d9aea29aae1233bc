"""A local sweep's trials run at normal priority: Ray's workers would otherwise start at nice 15."""
from __future__ import annotations

import os

import pytest

from clsim.sweep import runtime_env


@pytest.mark.slow
def test_local_ray_workers_run_at_the_drivers_niceness_with_the_trials_threads():
    ray = pytest.importorskip("ray", reason="the sweep extra (pip install 'clsim[sweep]')")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env=runtime_env(threads=1, local=True))
    try:
        worker = ray.remote(lambda: (os.nice(0), os.environ["OMP_NUM_THREADS"]))
        assert ray.get(worker.remote()) == (os.nice(0), "1")
    finally:
        ray.shutdown()


def test_a_clusters_niceness_is_its_own_and_the_environment_chooses_the_local_one(monkeypatch):
    assert "RAY_worker_niceness" not in runtime_env(threads=2, local=False)["env_vars"]
    monkeypatch.setenv("RAY_worker_niceness", "5")
    assert runtime_env(threads=2, local=True)["env_vars"]["RAY_worker_niceness"] == "5"
