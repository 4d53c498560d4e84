"""Train the text-to-video model.

    python -m trainer.train --config configs/demo.yaml [--set run.steps=100 --set parallel.strategy=ddp]
    torchrun --standalone --nproc_per_node 2 -m trainer.train --config ... --set parallel.strategy=ddp

A run whose run.out_dir already holds a checkpoint resumes from it. Exit codes: 0 = finished,
75 = stopped by SIGUSR1/SIGTERM after writing a checkpoint (EXIT_REQUEUE: requeue the job to continue),
74 = a write of the run failed for lack of space (EXIT_DISK_FULL: free space, then rerun to resume),
2 = bad config, 1 = any other error (a damaged checkpoint that cannot be used: one line, no traceback).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from common.config import ConfigError, load_config
from common.logs import rank_from_env, setup_logging
from trainer.config import TrainConfig
from trainer.loop import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(rank=rank_from_env() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from trainer.distributed import leave_process_group_on_exit
    from trainer.storage import StorageFault

    with leave_process_group_on_exit():
        try:
            code = run_training(cfg)
        except StorageFault as e:  # raised on every rank together: the message is the whole report
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = e.exit_code
        ignore_stop_signals()
        return code


def ignore_stop_signals() -> None:
    """The run has ended and says how (0 finished, EXIT_REQUEUE saved and "requeue me", else failed). From here
    to the exit, the ranks' last barrier included, a late USR1 (a scheduler's "save and requeue") or a
    repeated SIGTERM (SLURM sends a preempted task two) must not replace that code with 128+N."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    from trainer.distributed import exit_process

    exit_process(main())
