"""Reservoir replay, Continual World's "perfect memory" baseline (Wołczyk et al. 2021).

CW runs it as plain SAC whose replay buffer is never emptied and takes new transitions by
reservoir sampling (`--buffer_type reservoir --reset_buffer_on_task_change False`, a buffer of
2e7 transitions, batch 512 in its paper runs), so every update draws uniformly from every task seen
so far. Here the strategy switches the SAC learner's buffer to that mode (`reservoir_size`); the
batch size stays --batch-size (give 512 for CW's setting). Every task's transitions are kept raw:
the ledger records ε = ∞ for each. PPO is on-policy (no buffer to keep) and supervised streams have
`er`/`derpp`: both are refused in one line.
"""
from __future__ import annotations

from dataclasses import dataclass

from clsim.config import opt
from clsim.errors import UserError
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("reservoir")
class Reservoir(Strategy):
    """SAC's replay buffer kept across tasks with reservoir sampling (CW's perfect memory)."""

    learners = ("rl",)
    data_access = "raw: keeps every task's transitions in the replay buffer"

    @dataclass
    class Options:
        reservoir_size: int = opt(0, "transitions kept over the whole run (0, or more than sac_steps x tasks: "
                                  "every one; CW: 2e7)", low=0)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        if not hasattr(learner, "reservoir_size"):
            raise UserError("reservoir keeps an off-policy replay buffer across tasks (Continual World's SAC); "
                            "PPO learns on-policy from fresh rollouts: use a SAC scenario (cw10, cw20, cw_triplets, "
                            "metaworld:<task>), or er/derpp for supervised streams")
        size = self.options.reservoir_size or learner.o.sac_steps * len(scenario.tasks)
        learner.reservoir_size = size
        learner.buffer_size()   # refused now, before the run starts, when it cannot fit in memory

    def before_task(self, task):
        self.ledger.raw(task.dataset_id, "reservoir replay buffer")

    def task_metrics(self):
        buffer = self.learner.buffer
        return {} if buffer is None else {"buffer_transitions": buffer.count, "buffer_bytes": buffer.nbytes()}
