"""Independence of the privacy-relevant random draws: the one-run audit's canary coins, DP-SGD's
Poisson masks and noise never reuse draws of one another or of the model's initialisation."""
from __future__ import annotations

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from clsim.experiment import Experiment


def phi(windows: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
    """The correlation (phi coefficient) of each row of `windows` with `coins` (booleans)."""
    w, c = windows.float(), coins.float()
    cov = (w * c).mean(1) - w.mean(1) * c.mean()
    return cov / (w.std(1, unbiased=False) * c.std(unbiased=False)).clamp(min=1e-12)


def audited_run(monkeypatch, seed=0):
    """A one-task DP-SGD run with a one-run audit, and every Poisson mask it drew."""
    masks = []
    draw = UniformWithReplacementSampler.__iter__

    def recording(self):
        for picked in draw(self):
            mask = torch.zeros(self.num_samples, dtype=torch.bool)
            mask[picked] = True
            masks.append(mask)
            yield picked
    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", recording)
    experiment = Experiment(scenario="split_digits", strategy="dpsgd", n_tasks=1, epochs=2, batch_size=300,
                            audit="one-run", audit_canaries=300, audit_guesses=10, seed=seed, progress=False,
                            out=None)
    summary = experiment.run().summary
    return experiment.audit.canaries.kept, masks, summary


@pytest.mark.slow
def test_canary_coins_do_not_correlate_with_any_steps_sampling_mask(monkeypatch):
    """Each step's mask is compared with the coins at every alignment (window of the mask's rows):
    a coin stream shared with the sampler shows as a window that copies the coins (the coins and
    a mask drawn from the same uniforms: kept iff u < 1/2, in the batch iff u < q)."""
    kept, masks, _ = audited_run(monkeypatch)
    assert len(masks) >= 8 and 100 < int(kept.sum()) < 200
    for step, mask in enumerate(masks):
        windows = mask.unfold(0, len(kept), 1)       # [alignments, canaries]
        # independent: phi ~ N(0, 1/300), sd 0.058; a copied stream gives ~ sqrt(q) ≈ 0.55 here
        assert phi(windows, kept).abs().max() < 0.35, f"step {step}'s mask follows the canary coins"


def test_the_noise_and_the_masks_do_not_come_from_the_stream_that_initialised_the_model():
    """torch's global generator (seeded with --seed) initialises the model: its uniforms are the
    first weights. Neither the noise's seed nor the uniforms of the masks may repeat them (two
    equal consecutive floats by chance: about 4000²/2⁴⁸)."""
    experiment = Experiment(scenario="split_digits", strategy="dpsgd", n_tasks=1, epochs=1, batch_size=300,
                            seed=0, progress=False, out=None)
    parts = experiment.build()
    init = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    mechanism = parts.mechanism
    assert mechanism.seed != int(torch.randint(0, 2 ** 60, (1,), generator=torch.Generator().manual_seed(0)))
    drawn = torch.rand(4000, generator=parts.learner.generator)    # what Poisson masks are drawn from
    pairs = set(zip(init[:-1].tolist(), init[1:].tolist()))
    assert not any(pair in pairs for pair in zip(drawn[:-1].tolist(), drawn[1:].tolist()))


def test_an_audited_run_is_deterministic(monkeypatch):
    first = audited_run(monkeypatch, seed=3)
    second = audited_run(monkeypatch, seed=3)
    assert torch.equal(first[0], second[0]) and first[2]["audit"] == second[2]["audit"]
    assert first[2]["accuracy_matrix"] == second[2]["accuracy_matrix"]
