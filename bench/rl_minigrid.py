"""PPO on MiniGrid through the real CLI: Empty-Random-5x5 alone, then the task sequence.

    OMP_NUM_THREADS=1 python bench/rl_minigrid.py [--parts single,sequence] [--timesteps 25000]

single:   Empty-Random-5x5, 1e5 env steps: success rate (target >= 0.9) and mean return on 20
          fixed evaluation episodes, environment steps per second.
sequence: Empty-Random-5x5 -> DoorKey-5x5 -> Unlock -> LavaGapS5 (task_il, per-task heads) for
          naive and EWC: raw return and success matrices, normalised ACC/BWT/forgetting.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.rl_cartpole import run  # noqa: E402


def fmt(matrix) -> str:
    return "\n".join("    " + " ".join(f"{v:6.2f}" for v in row) for row in matrix)


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="single,sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-timesteps", type=int, default=100_000)
    p.add_argument("--timesteps", type=int, default=200_000, help="per task, sequence (1e5 leaves "
                   "DoorKey/Unlock unsolved after the first task in some runs)")
    p.add_argument("--strategies", default="naive,ewc")
    p.add_argument("--ewc-lambda", type=float, default=1e4)
    p.add_argument("extra", nargs="*", help="more run_scenario.py flags for the sequence runs (after --)")
    a = p.parse_args()
    if "single" in a.parts:
        s = run("--scenario", "minigrid", "--minigrid-tasks", "Empty-Random-5x5", "--seed", str(a.seed),
                "--ppo-timesteps", str(a.single_timesteps))
        d = s["score_details"]
        print(f"## single: Empty-Random-5x5, {a.single_timesteps} env steps, seed {a.seed}: success "
              f"{d['success_rate']['matrix'][0][0]:.2f} (target >= 0.9), return {d['return_raw']['matrix'][0][0]:.3f}, "
              f"env steps/s {a.single_timesteps / s['wall_time']['train']:.0f} (incl. updates)\n", flush=True)
    if "sequence" in a.parts:
        print(f"## sequence {a.timesteps} env steps per task, task_il, seed {a.seed}, EWC λ {a.ewc_lambda:g}")
        for strategy in a.strategies.split(","):
            s = run("--scenario", "minigrid", "--strategy", strategy, "--seed", str(a.seed),
                    "--ppo-timesteps", str(a.timesteps), *a.extra,
                    *(["--ewc-lambda", str(a.ewc_lambda)] if strategy == "ewc" else []))
            d = s["score_details"]
            print(f"{strategy}: ACC {s['acc']:.3f}  BWT {s['bwt']:.3f}  forgetting {s['forgetting']:.3f} "
                  f"(normalised)  wall {s['wall_time']['total']:.0f}s")
            print("  raw return matrix:\n" + fmt(d["return_raw"]["matrix"]))
            print("  success matrix:\n" + fmt(d["success_rate"]["matrix"]), flush=True)


if __name__ == "__main__":
    main()
