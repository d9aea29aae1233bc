"""--compile, --precision and the host-known task index of training batches (on the CPU; the
GPU's host waits are counted in test_cuda.py)."""
from __future__ import annotations

import pytest
import torch

from clsim.config import RunOptions
from clsim.learners.base import Batch
from clsim.learners.supervised import SupervisedLearner
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
from conftest import read_summary, run_cli


def learner_for(setting="task_il"):
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting=setting))
    learner = SupervisedLearner(scenario.make_model(), lr=0.1, momentum=0.0, batch_size=16,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    return scenario, learner


def test_task_il_batches_carry_their_task_and_the_head_follows_it():
    scenario, learner = learner_for()
    task = scenario.tasks[2]
    batch = next(iter(learner.batches(task, 0)))
    assert batch.task == 2 and bool((batch.t == 2).all())
    # the host-known index picks the head: a wrong device-side t is never read
    misleading = batch._replace(t=torch.zeros_like(batch.t))
    losses, out = learner.forward(misleading)
    torch.testing.assert_close(out, learner.model.heads[2](learner.model.backbone(batch.x)))
    without = batch._replace(task=None)        # mixed-task batches keep the per-example path
    torch.testing.assert_close(learner.forward(without)[1], out)


def test_bf16_mixed_forward_is_bfloat16_and_close_to_float32():
    scenario, learner = learner_for()
    batch = next(iter(learner.batches(scenario.tasks[0], 0)))
    full, out32 = learner.forward(batch)
    learner.speed_options(False, "bf16-mixed")
    half, out16 = learner.forward(batch)
    assert out16.dtype == torch.bfloat16 and half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    assert not torch.equal(half, full)


@pytest.mark.slow
def test_compile_under_privacy_runs_eagerly_and_says_why(tmp_path):
    proc = run_cli("--scenario", "split_digits", "--strategy", "naive", "--privacy", "dpsgd", "--compile", "true",
                   "--checkpoint", "false", "--epochs", "1", out=tmp_path)
    assert "--compile: runs eagerly: --privacy dpsgd" in proc.stderr
    assert read_summary(tmp_path)["acc"] > 0


@pytest.mark.slow
def test_bf16_under_privacy_is_refused_in_one_line(tmp_path):
    proc = run_cli("--scenario", "split_digits", "--privacy", "dpsgd", "--precision", "bf16-mixed",
                   out=tmp_path, check=False)
    assert proc.returncode == 2 and "bf16-mixed cannot train under --privacy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    """torch.compile (inductor on the CPU: needs a C++ compiler; minutes on a busy machine)."""
    scenario, learner = learner_for()
    batch = next(iter(learner.batches(scenario.tasks[1], 0)))
    eager = learner.forward(batch)[1]
    learner.speed_options(True, "32")
    compiled = learner.forward(batch)[1]
    assert learner._compiled is not None            # it compiled (no fallback)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
