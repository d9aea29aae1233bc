"""log.jsonl: one JSON object per step and per task end."""
from __future__ import annotations

import contextlib
import json

from clsim.loggers import Logger, to_json
from clsim.registry import register_logger


@register_logger("jsonl")
class JsonlLogger(Logger):
    """log.jsonl: every step record and every task record, one JSON object a line."""

    def __init__(self, context, options=None):
        super().__init__(context, options)
        self.file = open(self.path("log.jsonl"), "a")

    def _write(self, kind, record, flush=False):
        try:
            self.file.write(json.dumps({"kind": kind, **to_json(record)}) + "\n")
            if flush:
                self.file.flush()
        except OSError as exc:   # name the file: a full disk is reported with its path
            with contextlib.suppress(OSError):
                self.file.close()   # closed now, or the failed buffer is written again at exit
            raise OSError(exc.errno, exc.strerror, self.file.name) from None

    def step(self, record):
        self._write("step", record)

    def task(self, record):
        self._write("task", record, flush=True)

    def flush(self):
        self.file.flush()

    def abort(self):
        with contextlib.suppress(OSError):
            self.file.close()

    def close(self, summary):
        self.file.close()
