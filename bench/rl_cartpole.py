"""PPO on CartPole through the real CLI: single-task learning and the conflict stream.

    OMP_NUM_THREADS=1 python bench/rl_cartpole.py [--parts demo,single,conflict] [--seeds 0,1,2]

demo:     the README's commands, scenario defaults only (default -> reordered observations,
          task_il, 1e5 steps per task, EWC λ 1e4): every task learned (return >= 475 right after
          training on it), naive forgets task 0, EWC and BLIP keep it.

single:   CartPole-v1 alone, 1e5 env steps per seed: final evaluation return (target >= 475 for at
          least 2 of 3 seeds) and environment steps per second (collection + updates).
conflict: the two-task stream default -> swapped actions, per setting and strategy: normalised
          forgetting (naive is expected >= 0.8; EWC/BLIP at most half of naive's) and the matrices.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clsim import Experiment  # noqa: E402
from clsim.cli import from_argv  # noqa: E402
from clsim.registry import STRATEGIES  # noqa: E402


def run(*args: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        summary = from_argv(["--out", out, "--checkpoint", "false", "--progress", "false",
                                        *args]).run().summary
    return json.loads(json.dumps(summary, default=float))


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def demo(seeds: list[int], strategies: list[str]) -> None:
    print("## demo: `run_scenario.py --scenario cartpole --strategy S --seed k`, scenario defaults")
    for strategy in strategies:
        for seed in seeds:
            s = run("--scenario", "cartpole", "--strategy", strategy, "--seed", str(seed))
            raw = s["score_details"]["return_raw"]["matrix"]
            learned = all(raw[i][i] >= 475 for i in range(len(raw)))
            print(f"{strategy:6s} seed {seed}: raw returns {[[round(r) for r in row] for row in raw]}  "
                  f"ACC {s['acc']:.2f}  forgetting {s['forgetting']:.2f}  every task learned: {learned}  "
                  f"train {s['wall_time']['train']:.0f}s", flush=True)
    print()


def single(seeds: list[int], timesteps: int) -> None:
    print(f"## single task: CartPole-v1, {timesteps} env steps, rl-zoo settings (8x32, batch 256, 20 epochs)")
    passed = 0
    for seed in seeds:
        s = run("--scenario", "cartpole", "--cartpole-tasks", "default", "--ppo-timesteps", str(timesteps),
                "--seed", str(seed))
        ret = s["score_details"]["return_raw"]["matrix"][0][0]
        sps = timesteps / s["wall_time"]["train"]
        passed += ret >= 475
        print(f"seed {seed}: eval return {ret:.1f} (10 episodes, argmax)  env steps/s {sps:.0f} "
              f"(incl. updates)  train {s['wall_time']['train']:.0f}s")
    print(f"-> {passed}/{len(seeds)} seeds reach >= 475 (target: >= 2 of 3)\n", flush=True)


def conflict(seeds: list[int], timesteps: int, settings: list[str], strategies: list[str], extra: list[str],
             ewc_lambda: float) -> None:
    print(f"## conflict stream: default -> swap, {timesteps} env steps per task, EWC λ {ewc_lambda:g}")
    for setting in settings:
        naive = None
        for strategy in strategies:
            forgetting, acc, rows = [], [], []
            for seed in seeds:
                s = run("--scenario", "cartpole", "--cartpole-tasks", "conflict", "--setting", setting,
                        "--strategy", strategy, "--ppo-timesteps", str(timesteps), "--seed", str(seed), *extra,
                        *(["--ewc-lambda", str(ewc_lambda)] if strategy == "ewc" else []))
                forgetting.append(s["forgetting"])
                acc.append(s["acc"])
                rows.append(s["score_details"]["return_raw"]["matrix"])
            f = statistics.mean(forgetting)
            naive = f if strategy == "naive" else naive
            ratio = f" ({f / naive:.2f} x naive)" if naive and strategy != "naive" else ""
            print(f"{setting:9s} {strategy:6s} forgetting {mean_std(forgetting)}{ratio}  ACC {mean_std(acc)}  "
                  f"raw return matrices {rows}", flush=True)
    print()


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="demo,single,conflict")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--single-timesteps", type=int, default=100_000)
    p.add_argument("--timesteps", type=int, default=50_000, help="per task, conflict stream")
    p.add_argument("--settings", default="domain_il,task_il")
    p.add_argument("--strategies", default="naive,ewc,blip")
    p.add_argument("--ewc-lambda", type=float, default=1e4)
    p.add_argument("extra", nargs="*", help="more run_scenario.py flags for the conflict runs (after --)")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    strategies = [s for s in a.strategies.split(",") if s in STRATEGIES.names()]
    if "demo" in a.parts:
        demo(seeds, strategies)
    if "single" in a.parts:
        single(seeds, a.single_timesteps)
    if "conflict" in a.parts:
        conflict(seeds, a.timesteps, a.settings.split(","), strategies, a.extra, a.ewc_lambda)


if __name__ == "__main__":
    main()
