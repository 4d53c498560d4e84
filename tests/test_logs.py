"""common/logs.py: one handler however often it is set up, the rank in every line, levels filtered."""

from __future__ import annotations

import io
import logging

from common.logs import HANDLER_NAME, rank_from_env, setup_logging


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]


def test_lines_carry_the_rank_and_setup_is_idempotent():
    first, second = io.StringIO(), io.StringIO()
    try:
        setup_logging(rank=3, stream=first)
        setup_logging(logging.WARNING, rank=3, stream=second)
        assert len(_ours()) == 1
        logging.getLogger("data_pipeline.loader").info("not shown at WARNING")
        logging.getLogger("data_pipeline.loader").error("shard-000007.tar: not_found after 3 attempt(s)")
        assert first.getvalue() == ""
        line = second.getvalue().strip()
        assert line.startswith("[rank 3] ") and line.endswith(
            "ERROR data_pipeline.loader: shard-000007.tar: not_found after 3 attempt(s)")
        setup_logging(stream=first)  # outside a job: no rank prefix
        logging.getLogger("x").warning("plain")
        assert first.getvalue().split(" ", 1)[1] == "WARNING x: plain\n"
    finally:
        for handler in _ours():
            logging.getLogger().removeHandler(handler)


def test_rank_comes_from_torchrun_or_srun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert rank_from_env() is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert rank_from_env() == 5
    monkeypatch.setenv("RANK", "2")
    assert rank_from_env() == 2
