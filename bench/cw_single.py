"""SAC (Continual World's networks and settings) learning one Meta-World 3 task on the CPU.

    python bench/cw_single.py                       # reach-v3, 40k steps, seed 0 (the stated run)
    python bench/cw_single.py --task window-close-v3 --steps 100000 --hidden 256 --layers 4 --start-steps 10000

Prints the stochastic policy's success rate (10 seeded evaluation episodes, CW's figure) at every
evaluation, the first step at which it reached --goal, the wall time and the environment steps per
second. CW's defaults are kept (batch 128, lr 1e-3, updates every 50 steps from step 1000, one
update per environment step) except where a flag says otherwise: the budget (CW trains 1M steps
per task), and for a loaded CPU the network size (default 3x128; CW: 4x256) and the uniform-action
warm-up (default 5000; CW: 10000).

Measured (2-core CPU shared with other jobs, load ~14, OMP_NUM_THREADS=1, defaults): stochastic
success 0.00, 0.20, 0.90, 0.80, 0.90, 0.80, 0.60, 0.70 at 5k..40k steps (0.9 first at 15k), the
deterministic policy 1.00 from 20k on; 61 minutes.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from clsim import Experiment
from clsim.loggers import Logger


class EvaluationLines(Logger):
    """Prints the latest evaluation every 2500 environment steps as training goes."""
    writes_files = False
    next_print = 0

    def step(self, record):
        value = record.get("eval_success")
        if value is not None and record["env_steps"] >= self.next_print:
            print(f"  [{record['env_steps']} env steps, {record['wall_time']:.0f} s] latest evaluation: success "
                  f"{value:.2f}; training episodes: success {record.get('train_success', 0):.2f}", flush=True)
            self.next_print = record["env_steps"] + 2500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goal", type=float, default=0.9)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--start-steps", type=int, default=5_000)
    args = parser.parse_args()
    start = time.perf_counter()
    result = Experiment(scenario=f"metaworld:{args.task}", strategy="naive", seed=args.seed, out=None,
                        sac_steps=args.steps, sac_eval_every=args.eval_every, sac_hidden=args.hidden,
                        sac_layers=args.layers, sac_start_steps=args.start_steps, progress=False,
                        loggers=[EvaluationLines]).run()
    wall = time.perf_counter() - start
    curve = result.summary["evaluation_curve"]
    reached = None
    print(f"{args.task}, seed {args.seed}, {args.steps} steps, evaluation every {args.eval_every}, "
          f"{args.layers}x{args.hidden} networks, {args.start_steps} uniform-action steps")
    for point in curve:
        success = point["success_rate"][0]
        print(f"  step {point['task_step']:>7d}: success {success:.2f} (deterministic "
              f"{point['success_deterministic'][0]:.2f}), return {point['return_raw'][0]:.1f}")
        if reached is None and success >= args.goal:
            reached = point["task_step"]
    print(f"final success {result.summary['accuracy_matrix'][-1][0]:.2f}; reached {args.goal} at "
          f"{'never' if reached is None else f'step {reached}'}; wall {wall:.0f} s "
          f"({args.steps / wall:.0f} env steps/s incl. updates and evaluation) on {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


if __name__ == "__main__":
    main()
