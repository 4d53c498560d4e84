"""One logging path for every process of ours: `logging`, set up here, with the rank in the format.

The CLIs print their results (a table, a path) on stdout; everything said along the way (a skipped
shard, a signal received, a requeue) is a log record, so it can be filtered by level and a line from
a 64-rank job says which rank wrote it. The trainer's periodic status lines (`step 10/1000 | ...`)
go through `trainer.metrics.Metrics.print` on rank 0 only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

HANDLER_NAME = "vdm"


class RankFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL logger: message`, prefixed with `[rank R]` in a multi-process job."""

    def __init__(self, rank: int | None):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if self.rank is None else f"[rank {self.rank}] {text}"


def rank_from_env() -> int | None:
    """This process's rank under torchrun (RANK) or srun (SLURM_PROCID); None outside a job."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def setup_logging(level: int = logging.INFO, rank: int | None = None, stream: TextIO | None = None) -> None:
    """Send every logger's records at `level` and above to `stream` (default stderr), formatted with
    the rank. Idempotent: a second call replaces our handler instead of adding another."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(RankFormatter(rank))
    root.addHandler(handler)
    root.setLevel(level)
