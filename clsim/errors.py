"""The one exception type for user mistakes, and the hint it often carries."""
from __future__ import annotations

import difflib
from typing import Callable, Iterable


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line and exits with status 2."""


def did_you_mean(name: str, names: Iterable[str], spell: Callable[[str], str] = str) -> str:
    """' (did you mean X?)' for the one of `names` closest to a mistyped `name` (written with
    `spell`, e.g. as a flag), or '' when none is close."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {spell(close[0])}?)" if close else ""
