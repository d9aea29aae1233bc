"""Seeds of random streams of their own, derived from the run's --seed by name.

`seed_everything` seeds torch's global generator (which initialises the model: its first
uniforms are the first weights) and the learner's generator with --seed itself, so both draw the
same numbers. Privacy-relevant draws must not repeat those, nor one another: a generator seeded
with `derived_seed(seed, name)` starts a stream that no other name, and not --seed itself, starts
(numpy's SeedSequence hashes the pair)."""
from __future__ import annotations

import zlib

import numpy as np
import torch

PRIVATE_TRAINING = "private training"   # everything the learner draws under a mechanism (Poisson masks...)
CANARIES = "canaries"                   # the one-run audit's choice of canaries and their coins
MIA = "mia"                             # the loss-threshold heuristic's samples and split


def derived_seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed % 2 ** 64, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0])


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, name))
