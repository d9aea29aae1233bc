"""`clsim sweep SPEC.yaml`: many experiments on Ray Tune, resumable, then one report.

A spec is YAML:

    name: blip_vs_ewc                     # the sweep directory under --out (default: the file's name)
    base: {scenario: split_digits, setting: task_il, epochs: 2}   # options every trial shares
    grid: {strategy: [naive, ewc], seed: [0, 1]}                   # every combination
    # an axis whose values are mappings sets several options at once, e.g.
    #   method: [{strategy: derpp}, {strategy: sparcl, sparcl_sparsity: 0.9}]
    random:                               # optional: sampled options, crossed with the grid
      samples: 4
      seed: 0                             # the sample is fixed by this seed
      space: {lr: {loguniform: [0.001, 0.1]}, ewc_lambda: {choice: [1, 10, 100]}}
    threads: 1                            # CPU threads (and Ray CPUs) per trial

Option names are the run options' names (`epochs`, `lr`, `ewc_lambda`, ...), as in a YAML config.
A relative path (`strategy: my_method.py`, `data_root: data`) is read from the directory the sweep
is started in, as `clsim run --config` reads it (Ray Tune runs each trial in a working directory of
its own, so such paths are made absolute when the trials are resolved). The trials are resolved
here, deterministically, and each gets an id from its resolved options, so a rerun of the same spec skips every trial that has finished (a run directory with
summary.json under `trials/<id>/`) and runs the rest; Ray Tune schedules them (one CPU reservation
of `threads` each: no oversubscription), isolates failures and collects results. A failing trial
leaves its one-line error in `trials/<id>/error.txt` and the others go on.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from clsim import rundir
from clsim.config import DuplicateKeyError, load_yaml_unique
from clsim.errors import UserError
from clsim.registry import STRATEGIES

SPEC_KEYS = {"name", "base", "grid", "random", "threads"}
SAMPLERS = {"choice", "uniform", "loguniform", "randint"}
#: a sweep of more trials is refused unless --max-trials allows it (a typo in a grid, or a grid
#: meant for a cluster, would otherwise run silently for hours)
MAX_TRIALS = 1000
OUT = "sweeps"   # where sweep directories go unless --out says
#: run options naming a file or folder (the strategy, when it is a file, too)
PATH_OPTIONS = ("data_root", "wandb_dir")
#: options every trial gets from the sweep (run_trial), never from the spec
SET_BY_SWEEP = ("out", "progress")


def load_spec(path: str) -> dict:
    try:
        spec = load_yaml_unique(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read sweep spec {path}: {exc.strerror}") from None
    except DuplicateKeyError as exc:
        raise UserError(f"sweep spec {path} {exc}; keep one") from None
    except yaml.YAMLError as exc:
        raise UserError(f"sweep spec {path} is not valid YAML ({type(exc).__name__})") from None
    if not isinstance(spec, dict):
        raise UserError(f"sweep spec {path} must be a mapping with base, grid and/or random")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"unknown key(s) in sweep spec {path}: {', '.join(sorted(map(str, unknown)))}; "
                        f"use {', '.join(sorted(SPEC_KEYS))}")
    name = str(spec.setdefault("name", Path(path).stem))
    if name in ("", ".", "..") or "/" in name or "\0" in name or (os.altsep and os.altsep in name):
        raise UserError(f"sweep spec {path}: name {name!r} must be one directory name (no '/', not '..'): "
                        f"the sweep is written to --out/<name>")
    for key in ("base", "grid"):
        if not isinstance(spec.setdefault(key, {}), dict):
            raise UserError(f"sweep spec {path}: {key} must be a mapping of option names to values")
    for name, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep spec {path}: grid.{name} must be a non-empty list of values")
    threads = spec.setdefault("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"sweep spec {path}: threads must be a positive integer, got {threads!r}")
    random = spec.get("random")
    samples = random.get("samples", 1) if isinstance(random, dict) else 1
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"sweep spec {path}: random.samples must be a positive integer, got {samples!r}")
    return spec


def check_trial_count(spec: dict, path: str, max_trials: int) -> int:
    """How many trials `trials(spec)` makes, counted without making them; refused above `max_trials`."""
    count = spec["random"].get("samples", 1) if isinstance(spec.get("random"), dict) else 1
    for values in spec["grid"].values():
        count *= len(values)
    if count > max_trials:
        raise UserError(f"sweep spec {path} makes {count} trials, more than --max-trials {max_trials}; "
                        f"check its grid and random.samples, or pass --max-trials {count} to run them all")
    return count


def trials(spec: dict) -> list[dict]:
    """Every trial's resolved options: base, then one grid point, then one random sample."""
    names = list(spec["grid"])
    points = []
    for combo in itertools.product(*(spec["grid"][n] for n in names)):
        point = {}
        for name, value in zip(names, combo):
            point.update(value if isinstance(value, dict) else {name: value})
        points.append(point)
    samples = _random_samples(spec.get("random"))
    return [{**spec["base"], **point, **sample} for point in points for sample in samples]


def _random_samples(random: dict | None) -> list[dict]:
    if not random:
        return [{}]
    if not isinstance(random, dict) or not isinstance(random.get("space"), dict):
        raise UserError("sweep spec: random needs a space mapping option names to a sampler, "
                        "e.g. {lr: {loguniform: [0.001, 0.1]}}")
    n = random.get("samples", 1)   # checked by load_spec
    rng = np.random.default_rng(random.get("seed", 0))
    out = []
    for _ in range(n):
        sample = {}
        for name, sampler in random["space"].items():
            if not (isinstance(sampler, dict) and len(sampler) == 1 and set(sampler) <= SAMPLERS):
                raise UserError(f"sweep spec: random.space.{name} must be one of "
                                f"{{{', '.join(sorted(SAMPLERS))}: ...}}")
            (kind, args), = sampler.items()
            sample[name] = _draw(rng, kind, args, name)
        out.append(sample)
    return out


def _draw(rng, kind: str, args, name: str):
    try:
        if kind == "choice":
            return args[int(rng.integers(len(args)))]
        low, high = (float(a) for a in args)
        if kind == "uniform":
            return float(rng.uniform(low, high))
        if kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        return int(rng.integers(int(low), int(high)))
    except (TypeError, ValueError):
        raise UserError(f"sweep spec: random.space.{name}.{kind} needs "
                        f"{'a list of values' if kind == 'choice' else '[low, high]'}, got {args!r}") from None


def absolute_paths(options: dict) -> dict:
    """The options with every relative path made absolute against this process's working
    directory (absolute and `~` paths are kept as written, so their trials keep their ids)."""
    out = dict(options)
    for key, value in options.items():
        if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
            continue
        if key in PATH_OPTIONS or (key == "strategy" and STRATEGIES.is_file(value)):
            out[key] = os.path.abspath(value)
    return out


def trial_id(options: dict) -> str:
    """A short name fixed by the resolved options (so a rerun recognises a finished trial); a
    strategy file appears by its stem."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
    readable = "-".join(Path(str(options[k])).name.removesuffix(".py")
                        for k in ("scenario", "strategy", "seed") if k in options)
    return f"{readable}-{digest}" if readable else digest


def finished_run(trial_dir: Path) -> Path | None:
    done = [p.parent for p in trial_dir.glob("*/summary.json") if not p.parent.name.startswith(".")]
    return done[0] if done else None


def run_trial(options: dict, trial_dir: Path, threads: int) -> dict:
    """One trial in this process: the experiment's summary figures (raises on failure, after
    writing its one-line error to `trial_dir/error.txt`)."""
    import torch
    from clsim.experiment import Experiment
    torch.set_num_threads(threads)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "error.txt").unlink(missing_ok=True)
    if _data_parallel(options) and not options.get("address"):
        options = {**options, "address": "auto"}   # data-parallel: Ray Train workers on the sweep's cluster
    try:
        result = Experiment(**options, out=str(trial_dir), progress=False).run()   # SET_BY_SWEEP
    except Exception as exc:   # recorded in one line; Tune keeps the traceback under tune/<id>/
        line = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        (trial_dir / "error.txt").write_text(line.splitlines()[0] + "\n")
        raise
    return {"acc": result.summary["acc"], "bwt": result.summary["bwt"], "run_dir": str(result.run_dir)}


def _trainable(params: dict) -> None:
    from ray import tune
    trial = params["trial"]
    tune.report(run_trial(trial["options"], Path(trial["trial_dir"]), trial["threads"]))


def _reservation(trial: dict):
    """What Ray reserves for a trial: its `threads` CPUs; for a data-parallel trial (workers > 1) no
    CPU, as its process only waits while the Ray Train workers it starts (a CPU each, in a placement
    group of their own) do the work. (Tune takes no empty reservation: one byte of memory.)"""
    from ray.tune import PlacementGroupFactory
    return PlacementGroupFactory([{"memory": 1} if _data_parallel(trial["options"]) else {"CPU": trial["threads"]}])


def _data_parallel(options: dict) -> bool:
    workers = options.get("workers", 1)
    return isinstance(workers, int) and workers > 1


def _trial_name(trial) -> str:
    return trial.config["trial"]["id"]


def _progress(total: int, skipped: int):
    """A Tune callback printing one line per started, finished or failed trial."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.done, self.failed, self.started = skipped, 0, 0

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started += 1
            self._line()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            self._line()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            self._line()

        def _line(self):
            running = self.started - (self.done - skipped) - self.failed
            print(f"trials: {self.done} done, {running} running, {self.failed} failed of {total}",
                  file=sys.stderr, flush=True)

    return Progress()


def sweep(spec_path: str, out: str = OUT, address: str | None = None,
          workers: int | None = None, max_trials: int = MAX_TRIALS) -> tuple[Path, int]:
    """Run every unfinished trial of the spec on Ray (locally on `workers` CPUs, default all of
    them, or on the cluster at `address`); returns the sweep directory and how many trials failed.
    A spec of more than `max_trials` trials is refused before anything runs."""
    spec = load_spec(spec_path)
    check_trial_count(spec, spec_path, max_trials)
    sweep_dir = Path(out) / str(spec["name"])
    rundir.check_length(sweep_dir, f"the sweep directory {sweep_dir}", rundir.RUN_ROOM + 128)   # + trials/<id>/
    resolved = [absolute_paths(options) for options in trials(spec)]
    taken = sorted({key for options in resolved for key in options} & set(SET_BY_SWEEP))
    if taken:   # Experiment(**options, out=...) would fail in every trial with a TypeError
        raise UserError(f"sweep spec {spec_path} sets {', '.join(taken)}, which clsim sweep sets for each trial "
                        f"(its run directory goes under --out/<name>/trials/); remove it from the spec")
    pending, skipped = [], 0
    for options in resolved:
        trial_dir = sweep_dir / "trials" / trial_id(options)
        if finished_run(trial_dir):
            skipped += 1
        else:
            pending.append({"id": trial_id(options), "options": options, "trial_dir": str(trial_dir.resolve()),
                            "threads": spec["threads"]})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"sweep {spec['name']}: {len(resolved)} trials, {skipped} already finished, "
          f"{len(pending)} to run", file=sys.stderr)
    if pending:
        _run_on_ray(pending, sweep_dir, spec["threads"], address, workers, _progress(len(resolved), skipped))
    return sweep_dir, _write_status(sweep_dir, resolved)


def runtime_env(threads: int, local: bool) -> dict:
    """What each trial's worker process gets: this clsim on its path, `threads` threads, and on a
    local Ray the normal scheduling priority. Ray starts its workers at nice 15 (its
    `worker_niceness`), which on a machine shared with other work left each trial a few percent of
    a core; RAY_worker_niceness in the environment still chooses another value. A cluster's own
    setting is left alone."""
    project = str(Path(__file__).resolve().parent.parent)   # workers import this clsim
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads)}
    if local:
        env["RAY_worker_niceness"] = os.environ.get("RAY_worker_niceness", "0")
    return {"env_vars": env}


def _run_on_ray(pending: list[dict], sweep_dir: Path, threads: int, address: str | None,
                workers: int | None, progress) -> None:
    try:
        import ray
        from ray import tune
    except ImportError:
        raise UserError("clsim sweep runs on Ray: pip install 'clsim[sweep]' (or 'ray[tune]')") from None
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)   # a failed trial is one line, below
    env = runtime_env(threads, local=not address)
    try:
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(address="local", num_cpus=workers or os.cpu_count(), runtime_env=env, log_to_driver=False, logging_level="ERROR",
                     include_dashboard=False)
    except ConnectionError as exc:
        raise UserError(f"--address {address}: no Ray cluster answered ({exc}); start one with "
                        f"'ray start --head' or leave --address out to run locally") from None
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trainable, lambda config: _reservation(config["trial"])),
            param_space={"trial": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir.resolve()),
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[progress], verbose=0))
        tuner.fit()
    finally:
        ray.shutdown()


def _why(sweep_dir: Path, status: dict) -> str:
    """Why a trial did not finish, pointing only at files that exist."""
    if status.get("error"):
        return status["error"]
    tune_error = sweep_dir / "tune" / status["id"] / "error.txt"   # Ray Tune's, for a crash outside clsim
    if tune_error.is_file():
        return f"see {tune_error}"
    return "it did not run to its end (the sweep was stopped?); run the same command again to run it"


def _write_status(sweep_dir: Path, resolved: list[dict]) -> int:
    """sweep.json: every trial's options, its run directory or its one-line error; returns how
    many trials did not finish."""
    status = []
    for options in resolved:
        trial_dir = sweep_dir / "trials" / trial_id(options)
        run = finished_run(trial_dir)
        error = trial_dir / "error.txt"
        entry = {"id": trial_id(options), "options": options,
                 "status": "finished" if run else "failed" if error.is_file() else "not run",
                 "run_dir": str(run.relative_to(sweep_dir)) if run else None}
        if error.is_file() and not run:
            entry["error"] = error.read_text().strip()
        status.append(entry)
    (sweep_dir / "sweep.json").write_text(json.dumps(status, indent=2, default=str))
    failed = [s for s in status if s["status"] != "finished"]
    for s in failed:
        print(f"trial {s['id']} {s['status']}: {_why(sweep_dir, s)}", file=sys.stderr)
    print(f"sweep {sweep_dir}: {len(status) - len(failed)} of {len(status)} trials finished "
          f"({time.strftime('%H:%M:%S')})", file=sys.stderr)
    return len(failed)
