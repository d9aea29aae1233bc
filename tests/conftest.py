"""Shared fixtures: real CIFAR-10 built once from ../shared into a cache, and a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CACHE = Path(os.environ.get("CLSIM_CACHE", REPO / ".cache"))
# Tests reach nothing outside 127.0.0.1: a missing dataset is an error, never a download, unless a
# test asks for one (--download true, from its own server; tests/test_datasets.py).
os.environ["CLSIM_NO_DOWNLOAD"] = "1"


def build_cifar10() -> Path | None:
    """Root holding cifar-10-batches-py, built from ../shared on first use; None without ../shared."""
    root = CACHE / "cifar10"
    if (root / "cifar-10-batches-py" / "test_batch").is_file():
        return root
    tool = SHARED / "tools" / "make_cifar10.py"
    if not tool.is_file():
        return None
    tmp = CACHE / "cifar10.tmp"
    subprocess.run([sys.executable, str(tool), str(tmp)], check=True, capture_output=True)
    tmp.rename(root)
    return root


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = build_cifar10()
    if root is None:
        pytest.skip("real CIFAR-10 needs ../shared/tools/make_cifar10.py beside the repository")
    return root


def run_cli(*args: str, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run run_scenario.py as a user would; returns the finished process."""
    proc = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), "--out", str(out), *args],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if check and proc.returncode != 0:
        raise AssertionError(f"run_scenario.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def read_summary(out: Path) -> dict:
    """The summary.json of the only run directory under `out`."""
    runs = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return json.loads((runs[0] / "summary.json").read_text())


@pytest.fixture
def own_strategy_registry(monkeypatch):
    """Strategies a test loads from files are forgotten after it (the registry of the test session,
    e.g. the docs' strategy table, stays clsim's own)."""
    from clsim.registry import STRATEGIES
    STRATEGIES.names()   # the built-ins, loaded before the copy
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    monkeypatch.setattr(STRATEGIES, "_files", dict(STRATEGIES._files))


@pytest.fixture
def one_thread():
    """In-process runs with one torch thread, as the CLI's children run (OMP_NUM_THREADS=1), so
    their figures match figure for figure."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
