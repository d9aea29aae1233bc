"""SAC's cost in clsim, side by side in one process:

1. An update: clsim's step (the engine's calls for one batch, copied from clsim/engine.py's loop:
   learner.forward, the strategy's loss/penalty hooks, backward through the plain mechanism, the
   optimizer step with its Polyak update, the step figures) against a bare torch SAC update of the
   same networks and batch, written as CleanRL's sac_continuous_action.py does it (three losses,
   three backward passes, three Adam optimisers, targets by lerp). Goal: clsim ≤ 1.1x. Also the
   same single-backward objective without the engine's hooks, which isolates what the engine adds.
2. Environment steps per second of the Meta-World task as clsim wraps it (one-hot identity,
   success tracking, 200-step TimeLimit) against the raw Meta-World 3 environment.

Timings alternate between the two sides in rounds (the median round is reported), so load on a
shared machine hits both alike.

    python bench/sac_overhead.py [--updates 200] [--rounds 5] [--env-steps 2000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from clsim import Experiment
from clsim.rl.sac import ReplayBuffer


def parts(batch_size: int):
    p = Experiment(scenario="metaworld:reach-v3", strategy="naive", out=None, progress=False, seed=0,
                   batch_size=batch_size).build()
    learner = p.learner
    learner.buffer = ReplayBuffer(10_000, False, learner.generator)
    rng = np.random.default_rng(0)
    dim = learner.model.obs_dim + 1
    for _ in range(10_000):
        obs = np.concatenate([rng.normal(size=dim - 1), [1.0]]).astype(np.float32)
        learner.buffer.store(obs, rng.uniform(-1, 1, 4).astype(np.float32), float(rng.normal()), obs, 0.0, 0)
    return p


def objective_only(p, optimizer, n: int) -> float:
    """clsim's SAC objective without the engine: learner.forward, backward, optimizer step."""
    learner = p.learner
    start = time.perf_counter()
    for _ in range(n):
        batch = learner.buffer.sample(learner.batch_size, learner.device)
        losses, _ = learner.forward(batch)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        float(losses.detach().mean())
    return time.perf_counter() - start


def clsim_updates(p, optimizer, n: int) -> float:
    """The engine's per-batch calls (clsim/engine.py loop), n times."""
    learner, strategy, mechanism = p.learner, p.strategy, p.mechanism
    start = time.perf_counter()
    for _ in range(n):
        batch = learner.buffer.sample(learner.batch_size, learner.device)
        losses, outputs = learner.forward(batch)
        losses = strategy.loss(batch, losses, outputs)
        optimizer.zero_grad(set_to_none=True)
        mechanism.backward(losses, strategy.penalty())
        strategy.after_backward()
        mechanism.step(optimizer)
        strategy.after_step()
        record = {"loss": losses.detach().mean(), **learner.step_metrics(), **strategy.step_metrics(),
                  **mechanism.step_metrics()}
        float(record["loss"])
    return time.perf_counter() - start


class BareSAC:
    """CleanRL-style SAC update on the same modules (its own optimisers)."""

    def __init__(self, p):
        m, self.learner = p.learner.model, p.learner
        self.m = m
        self.q_opt = torch.optim.Adam(list(m.critic1.parameters()) + list(m.critic2.parameters()), lr=1e-3)
        self.pi_opt = torch.optim.Adam(list(m.trunk.parameters()) + list(m.heads.parameters()), lr=1e-3)
        self.a_opt = torch.optim.Adam([m.log_alpha], lr=1e-3)
        self.online = list(m.critic1.parameters()) + list(m.critic2.parameters())
        self.target = list(m.target1.parameters()) + list(m.target2.parameters())
        self.entropy = m.actions.target_entropy(0.089)
        self.gen = torch.Generator().manual_seed(0)

    def updates(self, n: int) -> float:
        m, acts, gen = self.m, self.m.actions, self.gen
        start = time.perf_counter()
        for _ in range(n):
            b = self.learner.buffer.sample(self.learner.batch_size, self.learner.device)
            x, nx = m.inputs(b.x), m.inputs(b.next_x)
            alpha = m.log_alpha[b.t].detach().exp()
            with torch.no_grad():
                a2, logp2 = acts.rsample(m.policy(b.next_x, b.t), gen)
                target = torch.min(m.target1(nx, a2, b.t), m.target2(nx, a2, b.t))
                backup = b.reward + 0.99 * (1 - b.done) * (target - alpha * logp2)
            q_loss = 0.5 * ((m.critic1(x, b.y, b.t) - backup) ** 2).mean() + \
                0.5 * ((m.critic2(x, b.y, b.t) - backup) ** 2).mean()
            self.q_opt.zero_grad()
            q_loss.backward()
            self.q_opt.step()
            a, logp = acts.rsample(m.policy(b.x, b.t), gen)
            pi_loss = (alpha * logp - torch.min(m.critic1(x, a, b.t), m.critic2(x, a, b.t))).mean()
            self.pi_opt.zero_grad()
            pi_loss.backward()
            self.pi_opt.step()
            alpha_loss = -(m.log_alpha[b.t] * (logp.detach() + self.entropy)).mean()
            self.a_opt.zero_grad()
            alpha_loss.backward()
            self.a_opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.target, self.online, 0.005)
            float(q_loss.detach())
        return time.perf_counter() - start


def env_steps(make, n: int) -> float:
    env = make()
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for k in range(n):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
        if terminated or truncated or (k + 1) % 200 == 0:
            env.reset(seed=k)
    return n / (time.perf_counter() - start)


def raw_env():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
    env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE["reach-v3-goal-observable"](seed=0)
    env._freeze_rand_vec = False
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--env-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    p = parts(args.batch_size)
    optimizer = p.learner.make_optimizer()
    bare = BareSAC(p)
    clsim_updates(p, optimizer, 10)   # warm-up both
    bare.updates(10)
    ours, theirs, plain = [], [], []
    for _ in range(args.rounds):
        ours.append(clsim_updates(p, optimizer, args.updates) / args.updates)
        theirs.append(bare.updates(args.updates) / args.updates)
        plain.append(objective_only(p, optimizer, args.updates) / args.updates)
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(plain)
    print(f"SAC update, batch {args.batch_size}, CW networks (4x256), {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds of {args.updates}:")
    print(f"  clsim step   {1000 * a:7.2f} ms")
    print(f"  bare torch   {1000 * b:7.2f} ms")
    print(f"  ratio        {a / b:7.3f}x (goal <= 1.1x)")
    print(f"  same objective without the engine's hooks {1000 * c:7.2f} ms: the engine adds {a / c:.3f}x")
    from clsim.rl.cw import make_task_env
    wrapped, raw = [], []
    for _ in range(args.rounds):
        wrapped.append(env_steps(lambda: make_task_env("reach-v3", 0, 1), args.env_steps))
        raw.append(env_steps(raw_env, args.env_steps))
    w, r = statistics.median(wrapped), statistics.median(raw)
    print(f"Meta-World reach-v3 env steps/s (random actions, median of {args.rounds} rounds of {args.env_steps}):")
    print(f"  clsim task env {w:8.0f}/s\n  raw env        {r:8.0f}/s\n  ratio (raw/clsim) {r / w:.3f}x")
    print(f"machine: {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
