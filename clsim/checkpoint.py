"""Checkpoints at task boundaries, written atomically (a reader never sees half a file)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from clsim.errors import UserError


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: the run stopped before its first task ended; "
                        f"start it again") from None
    except Exception as exc:
        raise UserError(f"corrupt checkpoint {path} ({type(exc).__name__}); start the run again") from None
