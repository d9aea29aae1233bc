"""Continual-learning metrics as pure functions of the score matrix R (metrics.md).

`R[i][j]`: score on task j after training task i (0-based here); `b[j]`: the initial model's score.
"""
from __future__ import annotations

import math
import resource
import sys

import torch


def acc(R: list[list[float]], i: int) -> float:
    """Mean score over the tasks seen so far, after task i."""
    return sum(R[i][: i + 1]) / (i + 1)


def bwt(R: list[list[float]], i: int) -> float:
    """Backward transfer after task i: mean over j < i of `R[i][j] - R[j][j]` (0 for i = 0)."""
    if i == 0:
        return 0.0
    return sum(R[i][j] - R[j][j] for j in range(i)) / i


def fwt(R: list[list[float]], b: list[float], i: int) -> float:
    """Forward transfer up to task i: mean over 1 <= j <= i of `R[j-1][j] - b[j]` (0 for i = 0)."""
    if i == 0:
        return 0.0
    return sum(R[j - 1][j] - b[j] for j in range(1, i + 1)) / i


def forgetting(R: list[list[float]], i: int) -> float:
    """Mean over j < i of `max_{l<i} R[l][j] - R[i][j]` (Chaudhry et al. 2018; 0 for i = 0)."""
    if i == 0:
        return 0.0
    return sum(max(R[l][j] for l in range(i)) - R[i][j] for j in range(i)) / i


def after_task(R: list[list[float]], b: list[float], i: int) -> dict[str, float]:
    """ACC, BWT, FWT and forgetting after task i."""
    return {"acc": acc(R, i), "bwt": bwt(R, i), "fwt": fwt(R, b, i), "forgetting": forgetting(R, i)}


def summary(R: list[list[float]], b: list[float]) -> dict[str, float]:
    return after_task(R, b, len(R) - 1)


def finite_number(value) -> bool:
    """`value` is a finite int or float (not a bool), as a score or figure read back from a file must
    be: clsim writes a non-finite figure as null, and an int past a float's range is not a score."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # an int too large for a float
        return False


def tensor_bytes(tensors) -> int:
    """Bytes held by the given tensors, counting shared storage once."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

