"""ER and DER++: reservoir invariants and uniformity, logits stored at insertion, counted FLOPs,
and end-to-end runs on real digits through the CLI's from_argv (in-process, for speed)."""
from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import chisquare
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clsim.flops import TrainingFlops, example_flops, forward_flops
from clsim.models import MultiHeadNet
from clsim.strategies.replay import ReservoirBuffer
from clsim import Experiment
from clsim.cli import from_argv
from clsim.cli import main
from conftest import read_summary


def offer_stream(size: int, n: int, batch: int, generator: torch.Generator) -> ReservoirBuffer:
    buf = ReservoirBuffer(size, generator)
    ids = torch.arange(n, dtype=torch.float32)
    for chunk in ids.split(batch):
        m = len(chunk)
        buf.add(chunk.view(m, 1), chunk.long(), torch.zeros(m, dtype=torch.long), chunk.view(m, 1))
    return buf


def test_reservoir_invariants_and_logits_travel_with_examples():
    buf = offer_stream(50, 30, 8, torch.Generator().manual_seed(0))
    assert buf.count == 30 and buf.seen == 30            # not full yet: everything kept in order
    assert buf.y[:30].tolist() == list(range(30))
    buf = offer_stream(50, 1000, 32, torch.Generator().manual_seed(1))
    assert buf.count == 50 and buf.seen == 1000
    stored = buf.y.tolist()
    assert len(set(stored)) == 50                        # a slot holds one example, no duplicates
    assert torch.equal(buf.x.view(-1).long(), buf.y)     # x, y and logits stay aligned
    assert torch.equal(buf.logits.view(-1).long(), buf.y)


@pytest.mark.slow
def test_reservoir_inclusion_is_uniform_over_the_stream():
    """Every one of n offered examples ends in the buffer with probability size/n, whatever its
    arrival position (batches of 32 with slot collisions inside a batch included)."""
    size, n, trials = 50, 1000, 150
    g = torch.Generator().manual_seed(1234)
    hits = torch.zeros(n)
    for _ in range(trials):
        hits[offer_stream(size, n, 32, g).y] += 1
    assert hits.sum() == size * trials
    by_position = hits.view(20, 50).sum(1)              # 20 consecutive arrival groups of 50
    expected = trials * size / 20
    assert chisquare(by_position).pvalue > 1e-3, by_position
    # the first 50 examples (guaranteed in at first) are not favoured over the last 50
    assert abs(by_position[0] - by_position[-1]) < 6 * expected ** 0.5


def test_conv_flops_match_hand_count_and_flop_counter():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    body = nn.Sequential(conv, nn.Flatten())
    body.out_features = 8 * 8 * 8
    model = MultiHeadNet(body, [5])
    x = torch.randn(1, 3, 8, 8)
    layers = forward_flops(model, x)
    macs_conv = 8 * 8 * 8 * 3 * 9                        # output positions x channels x (cin x 3 x 3)
    assert layers == {"backbone.0": 2 * macs_conv, "heads.0": 2 * 512 * 5}
    # dense training = forward + input gradient + weight gradient; FlopCounterMode agrees on the
    # conv when its input needs a gradient (conv backward computes both)
    inp = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        conv(inp).sum().backward()
    assert example_flops({"c": layers["backbone.0"]}) == counter.get_total_flops() == 3 * 2 * macs_conv
    # sparse: weight density 0.25, gradient density 0.2 -> (2 * 0.25 + 0.2) x forward
    assert example_flops({"c": 1000}, {"c": 0.25}, {"c": 0.2}) == pytest.approx(700)
    counted = TrainingFlops(model, x)
    step = counted.add(torch.zeros(7, dtype=torch.long), {"backbone.0": 0.5})
    assert step == pytest.approx(7 * (2 * macs_conv * 1.5 + 3 * 2 * 512 * 5))


@pytest.mark.slow
def test_derpp_stores_the_logits_of_insertion_time(tmp_path):
    """Run DER++ on real digits in-process for a few steps: stored logits are the outputs the
    model gave each example before that step's update."""
    parts = Experiment(strategy="derpp", seed=3, epochs=1, lr=0.05, batch_size=32, n_tasks=2).build()
    strategy = parts.strategy
    seen = []

    class Watch:
        def step(self, record):
            if record["step"] <= 3:
                batch, outputs = strategy._pending
                slots = torch.arange(32 * (record["step"] - 1), 32 * record["step"])
                seen.append((strategy.buffer.logits[slots].clone(), outputs.clone(), batch.y.clone(),
                             strategy.buffer.y[slots].clone()))

        def task(self, record):
            pass

    parts.loggers = [Watch()]
    parts.train()
    for stored, outputs, y, stored_y in seen:
        assert torch.equal(stored, outputs) and torch.equal(stored_y, y)


@pytest.mark.slow
def test_er_and_derpp_beat_naive_on_digits_and_report_buffer_flops_privacy(tmp_path):
    acc = {}
    # ER averages one cross-entropy over current + buffer examples (Mammoth): half the step of a
    # sum of two means, so it gets twice the scenario's lr here
    for name, extra in (("naive", []), ("er", ["--lr", "0.1"]),
                        ("derpp", ["--derpp-alpha", "0.5", "--derpp-beta", "1.0"])):
        out = tmp_path / name
        from_argv(["--out", str(out), "--strategy", name, "--seed", "0", "--progress", "false",
                              *extra]).run()
        summary = read_summary(out)
        acc[name] = summary["acc"]
        if name == "naive":
            continue
        run_dir = next(p for p in out.iterdir() if p.is_dir())
        records = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["kind"] == "step"]
        # 500 examples of 1x8x8 float32 + int64 label + int64 task + 10 float32 logits
        expected_bytes = 500 * (64 * 4 + 8 + 8 + 10 * 4)
        assert summary["memory"]["strategy_state_bytes"] == expected_bytes
        assert steps[-1]["strategy/buffer_bytes"] == expected_bytes
        # dense counted FLOPs: 3 x forward of 64-100-100-10 per example, over current + replayed ones
        per_example = 3 * 2 * (64 * 100 + 100 * 100 + 100 * 10)
        draws = 1 if name == "er" else 2
        # replay on every step but the very first (Mammoth: whenever the buffer holds examples)
        first_task = [s for s in steps if s["task"] == 0]
        assert first_task[-1]["strategy/train_flops"] == pytest.approx(
            (first_task[-1]["examples_seen"] + draws * 32 * (len(first_task) - 1)) * per_example)
        forwarded = steps[-1]["examples_seen"] + draws * 32 * (len(steps) - 1)
        assert steps[-1]["strategy/train_flops"] == pytest.approx(forwarded * per_example)
        for ds in summary["privacy"]["datasets"].values():
            assert {"mechanism": "raw", "purpose": "replay buffer"} in ds["accesses"]
    assert acc["er"] > acc["naive"] + 20 and acc["derpp"] > acc["naive"] + 20, acc


def test_bad_replay_option_is_a_user_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--strategy", "derpp", "--replay-size", "0"]) == 2
    assert "--replay-size" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_buffer_larger_than_the_stream_keeps_every_example_and_allocates_only_those(tmp_path):
    """--replay-size past the examples a run offers (training examples x epochs) gives the same run as
    a buffer of exactly that many, which is all that is allocated (2^31 - 1 slots were 550 GB)."""
    run = dict(strategy="er", n_tasks=2, epochs=2, batch_size=128, seed=1, progress=False, loggers="jsonl",
               out=str(tmp_path))
    huge = Experiment(**run, replay_size=2**31 - 1).run().summary
    exact = Experiment(**run, replay_size=huge["examples_seen"]).run().summary   # every example offered
    assert huge["accuracy_matrix"] == exact["accuracy_matrix"]
    assert huge["memory"]["strategy_state_bytes"] == exact["memory"]["strategy_state_bytes"]


def _digits_run(strategy: str, *extra: str, tasks: int = 1, watch=None):
    """`strategy` through the engine on the first `tasks` tasks of split_digits (real digits)."""
    parts = from_argv(["--strategy", strategy, "--seed", "1", "--epochs", "1", "--lr", "0.05",
                                  "--batch-size", "32", *extra]).build()
    parts.scenario.tasks = parts.scenario.tasks[:tasks]
    strat, learner = parts.strategy, parts.learner
    records = []

    class Keep:
        def step(self, record):
            records.append(record)
            if watch is not None:
                watch(strat, record)

        def task(self, record):
            pass

    parts.loggers = [Keep()]
    parts.train()
    return strat, learner, records


@pytest.mark.parametrize("strategy, term", [("er", "strategy/replay_ce"), ("derpp", "strategy/derpp_mse"),
                                            ("sparcl", "strategy/derpp_mse")])
def test_replay_starts_at_the_second_step_of_the_first_task_as_mammoth(strategy, term):
    """Mammoth replays whenever its buffer is not empty: from step 2 of task 0 (clsim waited for task 1)."""
    strat, _, records = _digits_run(strategy, tasks=1)
    assert term not in records[0] and all(term in r for r in records[1:])
    # every step from the second forwards the buffer draw(s) too: 32 current + 32 (ER) or 64 (DER++)
    per_step = [b - a for a, b in zip([0] + [r["strategy/train_flops"] for r in records],
                                      [r["strategy/train_flops"] for r in records])]
    assert per_step[2] > 1.9 * per_step[0]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, term", [("er", "strategy/replay_ce"), ("sparcl", "strategy/derpp_mse")])
def test_replay_from_task_one_fills_the_buffer_in_task_0_and_draws_only_from_task_1(strategy, term):
    """--replay-from-task 1, as SparCL's official train() (`t > 0`): task 0 trains on its own
    batches while the buffer fills; task 1 replays from its first step (what the buffer holds)."""
    strat, _, records = _digits_run(strategy, "--replay-from-task", "1", tasks=2)
    first, second = [r for r in records if r["task"] == 0], [r for r in records if r["task"] == 1]
    assert first and not any(term in r for r in first) and all(term in r for r in second)
    assert strat.buffer.seen == records[-1]["examples_seen"]     # every trained example was offered


def test_er_loss_is_the_mean_over_the_concatenated_current_and_buffer_batch():
    """ER's loss at a step of task 0 recomputed by hand: the buffer draw (same generator state)
    joins the batch and one cross-entropy is averaged over all 64 examples (Mammoth's er.py)."""
    import torch.nn.functional as F
    from clsim.learners import Batch
    strat, learner, _ = _digits_run("er", tasks=1)
    task = strat.scenario.tasks[0]
    x, y = task.train.x[:32], task.train.y[:32]
    batch = Batch(x, y, torch.zeros(32, dtype=torch.long), torch.arange(32))
    losses, outputs = learner.forward(batch)
    state = learner.generator.get_state()
    got = strat.loss(batch, losses, outputs)
    learner.generator.set_state(state)
    bx, by, bt, _ = strat.buffer.sample(32)
    logits = torch.cat([learner.model(x, 0), learner.model(bx, bt)])
    expected = F.cross_entropy(logits, torch.cat([y, by]))
    assert got.shape == (64,) and got.mean().item() == pytest.approx(expected.item(), rel=1e-6)
    old_rule = F.cross_entropy(logits[:32], y) + F.cross_entropy(logits[32:], by)   # sum of two means
    assert abs(got.mean().item() - old_rule.item()) > 0.1
