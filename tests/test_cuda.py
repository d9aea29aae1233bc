"""clsim on a CUDA device: the same runs as on the CPU give the same figures (skipped without one)."""
from __future__ import annotations

import warnings

import pytest
import torch

from clsim.config import RunOptions
from clsim.fisher import diagonal_fisher
from clsim.learners.supervised import SupervisedLearner
from clsim.registry import STRATEGIES
from conftest import read_summary, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False here)")


@pytest.mark.parametrize("strategy", ["ewc", "blip", "sparcl", "derpp"])
def test_strategy_on_cuda_matches_cpu(tmp_path, strategy):
    """Same seed, same data order: only float rounding differs between the devices."""
    runs = {}
    for device in ("cpu", "cuda"):
        run_cli("--strategy", strategy, "--epochs", "1", "--setting", "task_il", "--device", device,
                out=tmp_path / device)
        runs[device] = read_summary(tmp_path / device)
    assert runs["cuda"]["acc"] == pytest.approx(runs["cpu"]["acc"], abs=3.0)
    assert runs["cuda"]["memory"]["strategy_state_bytes"] == runs["cpu"]["memory"]["strategy_state_bytes"]


@pytest.mark.parametrize("privacy", ["dpsgd", "dplis"])
def test_private_training_on_cuda(tmp_path, privacy):
    """Opacus on the device: the accounted ε is the CPU run's, and training still learns."""
    runs = {}
    for device in ("cpu", "cuda"):
        run_cli("--strategy", "naive", "--privacy", privacy, "--epsilon", "4", "--epochs", "2",
                "--setting", "task_il", "--device", device, out=tmp_path / device)
        runs[device] = read_summary(tmp_path / device)
    assert runs["cuda"]["privacy"]["epsilon_worst"] == runs["cpu"]["privacy"]["epsilon_worst"] <= 4.0
    assert runs["cuda"]["acc"] > 60.0     # chance is 50 per task_il task


def test_conv_fisher_on_cuda_matches_cpu(cifar_root):
    """The layer-wise per-example Fisher of the reduced ResNet-18 (convolutions, eval BatchNorm)
    on real CIFAR-10: CUDA equals CPU, with no fallback to torch.func."""

    from clsim.scenarios.split_cifar import SplitCifarOptions, split_cifar
    scenario = split_cifar(SplitCifarOptions(n_tasks=2, train_per_class=32, test_per_class=2, backbone="resnet18"),
                           RunOptions(data_root=str(cifar_root), setting="class_il", download=False))
    torch.manual_seed(0)
    model = scenario.make_model()
    fishers = {}
    for device in ("cpu", "cuda"):
        learner = SupervisedLearner(model, lr=0.1, momentum=0.0, batch_size=32, device=torch.device(device),
                                    generator=torch.Generator().manual_seed(0))
        names = list(learner.shared_parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("error")     # a layer-wise/torch.func mismatch warns: fail on it
            fisher = diagonal_fisher(learner, scenario.tasks[0], names, 64, empirical=True)
        fishers[device] = {n: f.cpu() for n, f in fisher.items()}
    for n, f in fishers["cpu"].items():
        # cuDNN computes the batched pass in TF32 by default: agreement to TF32 rounding
        assert torch.allclose(fishers["cuda"][n], f, rtol=2e-2, atol=1e-3 * float(f.abs().max())), n


def test_training_steps_do_not_wait_for_the_device(tmp_path):
    """The step loop never makes the host wait for the GPU: step figures (loss, EWC penalty) are
    read one step late, and batches are sliced with an index copied to the device once per epoch.
    CUDA's sync debug mode counts the host waits; five more epochs add 200 steps but at most a
    couple of waits per epoch and task (evaluation and the Fisher pass are the same in both)."""
    from clsim import Experiment
    waits, steps = {}, {}
    for epochs in (1, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                summary = Experiment(strategy="ewc", setting="class_il", epochs=epochs, device="cuda",
                                     out=str(tmp_path / str(epochs))).run().summary
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits[epochs] = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
        steps[epochs] = summary["steps"]
    assert waits[1] > 0                                     # the counter sees evaluation's reads
    assert steps[6] - steps[1] == 5 * steps[1] >= 200
    assert waits[6] - waits[1] <= 5 * 5 * 2, (waits, steps)   # 5 more epochs x 5 tasks x at most 2


# Strategies whose step still reads the device (found by reading the code; not yet measured on a GPU).
# er, derpp, sparcl and agem no longer do: their buffers and records live on the device, indices
# decided on the host travel through pinned memory, and A-GEM chooses its projection on the device.
STEP_READS = {
    "gem": "the QP is solved with scipy on the host every step (strategies/agem.py)",
    "dpsgd": "each Poisson batch is drawn on the host (its index now travels asynchronously); Opacus's "
             "clipping and noise steps have not been read for host waits",
    "dplis": "as dpsgd, and DPlis's K perturbed copies have not been read for host waits",
}


def host_waits(strategy: str, epochs: int, out) -> tuple[int, int]:
    from clsim import Experiment
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            summary = Experiment(strategy=strategy, epochs=epochs, device="cuda", out=str(out)).run().summary
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught), summary["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    pytest.param(name, marks=pytest.mark.xfail(reason=STEP_READS[name], strict=False)) if name in STEP_READS
    else name for name in sorted(STRATEGIES.names()) if "supervised" in STRATEGIES.get(name).target.learners])
def test_no_strategy_waits_for_the_device_every_step(tmp_path, strategy):
    """Two more epochs (in the strategy's own setting) add at most 2 host waits per task and epoch,
    far fewer than the steps they add: whatever a strategy reads per step is read a step late."""
    (w1, s1), (w3, s3) = host_waits(strategy, 1, tmp_path / "1"), host_waits(strategy, 3, tmp_path / "3")
    tasks = 5
    assert s3 - s1 >= 2 * tasks * 4, (s1, s3)              # enough extra steps to tell
    assert w3 - w1 <= 2 * tasks * 2, (strategy, w1, w3, s1, s3)
