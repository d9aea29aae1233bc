"""Data-parallel runs: one run over N processes (GPUs, machines), with torch.distributed as the engine.

How a run is split (docs/distributed.md). Every worker holds the whole run: the same seed, the same
parts, the same strategy state, and draws the same random numbers in the same order, so every
decision a strategy takes (a batch's order, a replay draw, a reservoir slot, a mask, a herding
choice) is taken identically on every worker with no message. What is split is the arithmetic
that dominates a step:

- a training forward (`sharded_forward`, called by the learner's `forward`, so the current batch,
  replay draws and memory batches alike): worker r computes the rows of its block of the batch,
  the rows of the others arrive by all_gather (values only), and every worker continues with the
  whole batch's losses and outputs. The backward then reaches this worker's rows only, with their
  gradient scaled by N; whatever else the loss holds (a penalty, a term of the parameters) is
  computed on every worker with its full gradient. `average_gradients` (all_reduce, / N) then gives
  every worker  Σ_rows + replicated terms: the 1-worker gradient, up to the order of float sums;
- evaluation (`gather_rows` of the test outputs) and the Fisher passes (`all_reduce_sum` of the
  per-example squares of each worker's rows).

Launch: `torchrun --nproc-per-node N run_scenario.py ...` (or python -m torch.distributed.run)
sets the environment this module joins (`group`); `--workers N` starts the N processes itself
through torch.distributed.run's API (`launch`). Only rank 0 writes the run directory.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from clsim import rundir
from clsim.errors import UserError

#: how long a collective waits for a silent peer before the run stops (a dead peer is seen at once)
TIMEOUT = datetime.timedelta(minutes=10)


class WorkerLost(UserError):
    """Another worker of this run stopped: this one cannot go on alone."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_split = True   # whether forwards, evaluation and Fisher passes are split over the workers


def split_rows(on: bool) -> None:
    """Split the rows of forwards, evaluations and Fisher passes over the workers (the default),
    or not: a private mechanism gives each worker its rows itself and reduces the clipped sums."""
    global _split
    _split = on


def splitting() -> bool:
    return active() and _split


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def launched() -> int:
    """The number of workers a launcher (torchrun, `launch`) started this process among; 1: none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device(name: str) -> str:
    """A worker's device: `cuda` means the GPU of its local rank."""
    if active() and name == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


@contextlib.contextmanager
def group(workers: int, device_name: str, options: dict):
    """Inside: this process in the process group torchrun or `launch` set up (gloo on CPU, nccl on
    GPU), with a worker whose options differ from rank 0's refused. Nothing happens in a single
    process, nor in a group that someone else created (a script of the user's, Ray Train): its
    creator tears it down.

    A group created here is torn down here, after a final barrier: a process that exits with its
    group alive leaves gloo's threads holding the last collectives' work to be freed while the
    interpreter finalises, which aborts that process (SIGABRT) now and then, after a finished run
    (pytorch/pytorch#179291, #190489). The barrier first: no worker closes its connections while a
    peer still has a collective in flight. After a failure there is no barrier (a peer may be gone)."""
    world = launched()
    if world == 1 or active():
        yield
        return
    if workers not in (1, world):
        raise UserError(f"--workers {workers} but the launcher started {world} processes; drop --workers "
                        f"under torchrun, or give it {world}")
    cuda = device_name.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        _refuse_other_options(options)
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    _collective(dist.barrier)
    dist.destroy_process_group()


def _refuse_other_options(options: dict) -> None:
    # where a machine keeps its files may differ; only rank 0 writes anyway
    mine = {k: repr(v) for k, v in sorted(options.items()) if k not in ("out", "data_root", "progress")}
    everyone: list = [None] * dist.get_world_size()
    _collective(dist.all_gather_object, everyone, mine)
    for r, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            keys = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
            raise UserError(f"worker {r} was started with other options than worker 0 (they differ in "
                            f"{', '.join(keys)}); start every worker with the same command")


def check(scenario, learner, strategy, mechanism) -> None:
    """Refuse, in one line, what does not run data-parallel yet (docs/distributed.md says why);
    warn where the figures cannot match one process's."""
    if not active():
        return
    if mechanism.name != "none" and (strategy.data_access != "accounted" or strategy.model_forwards > 1):
        raise UserError(f"this strategy keeps or replays raw examples, which --privacy {mechanism.name} does not "
                        f"split over workers (each worker clips its own rows); run it in one process")
    if learner.kind != "supervised" and (mechanism.name != "none"
                                         or getattr(getattr(learner, "o", None), "ppo_envs", 0) < size()):
        raise UserError(f"scenario {scenario.name} runs on several workers with PPO, no privacy mechanism "
                        f"and at least one environment a worker (--ppo-envs >= workers); run it in one process")
    if rank() == 0 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in learner.model.modules()):
        print("warning: batch normalisation uses each worker's rows for its batch statistics (as DDP does), so "
              "the figures differ from one process's", file=sys.stderr)


def _collective(fn, *args, **kwargs):
    """A collective call; a peer that died turns into one line, not a backend traceback."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WorkerLost(f"another worker of this run stopped ({first})") from None


# ---------------------------------------------------------------- splitting the arithmetic

def block(n: int, r: int | None = None, world: int | None = None) -> slice:
    """Worker r's contiguous block of n rows (blocks differ in size by one at most)."""
    if not splitting():
        return slice(0, n)
    r, world = rank() if r is None else r, size() if world is None else world
    return slice(r * n // world, (r + 1) * n // world)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by N (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_rows(local: torch.Tensor, n: int, scale: bool = True) -> torch.Tensor:
    """The n rows of a batch from every worker's block (`block`), in order: this worker's own rows
    carry their autograd graph (gradient scaled by N when `scale`), the others' are values."""
    if not splitting():
        return local
    world, width = size(), -(-n // size())
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[:len(local)] = local.detach()
    pieces = [torch.empty_like(padded) for _ in range(world)]
    _collective(dist.all_gather, pieces, padded.contiguous())
    own = _ScaledGradient.apply(local, float(world)) if scale and local.requires_grad else local
    rows = [own if r == rank() else pieces[r][:len(range(n)[block(n, r, world)])] for r in range(world)]
    return torch.cat(rows)


def sharded_forward(forward, batch):
    """`forward(batch) -> (losses, outputs)` computed on this worker's block of the batch's rows and
    gathered into the whole batch's (see the module docstring)."""
    if not splitting():
        return forward(batch)
    losses, outputs = forward(own_rows(batch))
    return gather_rows(losses, len(batch.y)), gather_rows(outputs, len(batch.y))


def own_rows(batch, split: bool = False):
    """This worker's block of a Batch's rows (`split`: even where forwards are not split)."""
    if not (splitting() or (split and active())):
        return batch
    n = len(batch.y)
    rows = slice(rank() * n // size(), (rank() + 1) * n // size())
    return batch._replace(**{f: v[rows] for f, v in batch._asdict().items()
                             if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == n})


def sharded(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(*tensors)` (rows in, rows out) computed on this worker's block of rows, gathered."""
    if not splitting():
        return fn(*tensors)
    n, rows = len(tensors[0]), block(len(tensors[0]))
    return gather_rows(fn(*(t[rows] for t in tensors)), n)


def average_gradients(params) -> None:
    """Every worker's p.grad becomes the mean over workers (one flat all_reduce). Every worker has
    gradients for the same parameters: the same code ran on the same batch."""
    with_grad = [p for p in params if p.grad is not None]
    if not active() or not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    _collective(dist.all_reduce, flat)
    flat /= size()
    offset = 0
    for p in with_grad:
        k = p.grad.numel()
        p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
        offset += k


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sum over workers of each tensor (the same keys on every worker)."""
    if not active() or not tensors:
        return tensors
    names = list(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    _collective(dist.all_reduce, flat)
    out, offset = {}, 0
    for n in names:
        k = tensors[n].numel()
        out[n] = flat[offset:offset + k].view_as(tensors[n])
        offset += k
    return out


def broadcast(obj):
    """Rank 0's `obj` on every worker (e.g. the checkpoint a resumed run continues from)."""
    if not active():
        return obj
    box = [obj if rank() == 0 else None]
    _collective(dist.broadcast_object_list, box, 0)
    return box[0]


# ---------------------------------------------------------------- starting the workers

REPORT = "CLSIM_WORKER_REPORT"   # where `launch`'s workers leave their one-line errors and run directory


def note_run_directory(path: Path) -> None:
    """Rank 0 of a `launch`ed run says where its run directory is (for the launcher's last line)."""
    if os.environ.get(REPORT) and rank() == 0:
        Path(os.environ[REPORT], "partial").write_text(str(path))


def _worker(experiment, resume_dir):
    """One worker process started by `launch`: runs the experiment; rank 0's result is returned."""
    signal.signal(signal.SIGTERM, _interrupt)   # stopped by the launcher: as Ctrl-C, resumable
    me = int(os.environ["RANK"])
    if me > 0:   # rank 0 says what every worker would say
        sys.stderr = open(os.devnull, "w")
    try:
        result = experiment.run(resume_dir)
    except UserError as exc:
        Path(os.environ[REPORT], f"error{me}").write_text(str(exc))
        raise SystemExit(2) from None
    except (rundir.Interrupted, KeyboardInterrupt):
        raise SystemExit(130) from None
    return (result.summary, result.run_dir) if me == 0 else None


def _interrupt(signum, frame):
    signal.signal(signum, signal.SIG_IGN)   # once: a second one would interrupt the exit itself
    raise KeyboardInterrupt


def launch(experiment, workers: int, resume_dir: Path | None):
    """Run `experiment` on `workers` processes of this machine (torch.distributed.run's API, with
    its rendezvous on 127.0.0.1) and return rank 0's summary and run directory. A worker that fails or is killed
    stops the others at once (the elastic agent's watch); the error is one line, and the run
    directory, once a task has finished, is kept for --resume."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    with tempfile.TemporaryDirectory(prefix="clsim-workers-") as report:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn", local_addr="127.0.0.1")
        # the elastic agent logs each failure with its traceback: the one line below says it
        for name in ("torch.distributed.elastic", "torch.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        before = os.environ.get(REPORT)
        os.environ[REPORT] = report   # the spawned workers inherit it
        try:
            results = elastic_launch(config, _worker)(experiment, resume_dir)
        except ChildFailedError as exc:
            raise _failure(exc, Path(report)) from None
        except KeyboardInterrupt:
            partial = _kept(Path(report))
            if partial is not None:
                raise rundir.Interrupted(partial) from None
            raise
        finally:
            os.environ.pop(REPORT) if before is None else os.environ.__setitem__(REPORT, before)
    return results[0]


def _ray_worker(config: dict) -> None:
    """One worker of a Ray Train run (`launch_on_ray`): Ray Train has joined the process group."""
    import ray.train
    context = ray.train.get_context()
    os.environ.update(RANK=str(context.get_world_rank()), LOCAL_RANK=str(context.get_local_rank()),
                      WORLD_SIZE=str(context.get_world_size()))
    try:
        result = config["experiment"].run(config["resume_dir"])
    except UserError as exc:
        raise RuntimeError(f"{_RAY_ERROR}{exc}{_RAY_ERROR}") from None
    if context.get_world_rank() == 0:   # through Ray's object store: rank 0 may be on another machine
        ray.get(config["inbox"].put.remote({"summary": result.summary, "run_dir": str(result.run_dir),
                                            "host": socket.gethostname()}))


class _Inbox:
    """Rank 0's result, held for the driver by a Ray actor. Not a Ray Train checkpoint: that is
    written under RunConfig's storage_path on rank 0's machine, which the driver cannot read on a
    cluster without shared storage."""

    def __init__(self):
        self.result = None

    def put(self, result: dict) -> None:
        self.result = result

    def get(self) -> dict | None:
        return self.result


_RAY_ERROR = "<clsim-error>"


def launch_on_ray(experiment, workers: int, address: str, resume_dir: Path | None):
    """Run `experiment` on `workers` Ray Train workers of the cluster at `address` ("local": one
    started here) and return rank 0's summary and run directory (written on rank 0's machine)."""
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise UserError("--address runs the workers through Ray Train: pip install 'ray[train]'") from None
    project = str(Path(__file__).resolve().parent.parent)   # the workers import this clsim
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")])),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    logging.getLogger("ray").setLevel(logging.CRITICAL)
    inside = ray.is_initialized()   # a sweep's trial: already on the sweep's cluster, which stays up
    try:
        if not inside:
            ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level="ERROR",
                     **({"include_dashboard": False} if address == "local" else {}))
    except ConnectionError as exc:
        raise UserError(f"--address {address}: no Ray cluster answered ({exc}); start one with "
                        f"'ray start --head', or use --workers alone on one machine") from None
    except ValueError as exc:   # Ray's check of the address's form
        raise UserError(f"--address {address}: {exc}; give host:port, ray://host:port or local") from None
    try:
        inbox = ray.remote(num_cpus=0)(_Inbox).remote()
        with tempfile.TemporaryDirectory(prefix="clsim-ray-") as storage:
            trainer = TorchTrainer(
                _ray_worker, train_loop_config={"experiment": experiment, "resume_dir": resume_dir, "inbox": inbox},
                scaling_config=ScalingConfig(num_workers=workers,
                                             use_gpu=experiment.run_options.device.startswith("cuda")),
                run_config=RunConfig(storage_path=storage, failure_config=FailureConfig(max_failures=0)))
            try:
                trainer.fit()
                result = ray.get(inbox.get.remote())
            except Exception as exc:   # noqa: BLE001 - Ray wraps the worker's error: say it in one line
                text = str(exc)
                if _RAY_ERROR in text:
                    raise UserError(text.split(_RAY_ERROR)[1]) from None
                first = text.strip().splitlines()[-1][:200] if text.strip() else type(exc).__name__
                raise UserError(f"the Ray Train run failed: {first}") from None
    finally:
        if not inside:
            ray.shutdown()
    if result["host"] != socket.gethostname() and result["run_dir"] != "None":
        print(f"the run directory is on {result['host']}, the machine of worker 0 (give --out a shared "
              f"filesystem to have it everywhere)", file=sys.stderr)
    return result["summary"], None if result["run_dir"] == "None" else Path(result["run_dir"])


def _kept(report: Path) -> Path | None:
    """The run directory rank 0 claimed, if it was kept with a checkpoint to resume from."""
    note = report / "partial"
    partial = Path(note.read_text()) if note.is_file() else None
    return partial if partial is not None and (partial / "checkpoint.pt").is_file() else None


def _failure(exc, report: Path) -> UserError:
    """One line for a failed multi-worker run: a worker's own error (a user mistake is the same on
    every worker), else which worker died how, and where the run so far is kept."""
    errors = [e.read_text() for e in sorted(report.glob("error*"))]
    own = [e for e in errors if "another worker of this run stopped" not in e]
    if own:
        return UserError(own[0])
    how = lambda code: f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    dead = [f"worker {r} ({how(f.exitcode)})" for r, f in sorted(exc.failures.items()) if f.exitcode not in (2, 130)]
    line = f"{', '.join(dead) or 'a worker'} stopped the run"
    partial = _kept(report)
    if partial is not None:
        return UserError(f"{line}; the run so far is kept in {partial}; continue with: {rundir.RESUME} {partial}")
    return UserError(f"{line}; no task had finished, so nothing was kept")
