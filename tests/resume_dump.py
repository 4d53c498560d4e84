"""Resume a run the way `trainer.train` does and write the state it resumed into, gathered in full.

    torchrun --standalone --nproc_per_node M tests/resume_dump.py --config run.yaml --out dump.pt [--then-train]

Builds the real Trainer (which loads the latest checkpoint of run.out_dir on M ranks, whatever wrote
it) and, without training, gathers on rank 0: the full parameters and buffers, the full EMA and the
AdamW moments and step of every parameter, keyed by parameter name. tests/test_elastic_checkpoint.py
compares them with the checkpoint read directly (trainer.strategies.dcp_state.read_full), so a
reshard that loses, moves or reorders any piece fails there. With --then-train the same Trainer then
trains on as `trainer.train` would (the gathers only read), so a test checks the loaded state and the
finished run with one launch instead of two.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from common.logs import rank_from_env, setup_logging  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.distributed import exit_process, leave_process_group_on_exit  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (fsdp shard) gathered, or a plain tensor as is; on CPU."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """`<param name>.<exp_avg|exp_avg_sq|step>` for every parameter that has AdamW state (collective)."""
    if trainer.strategy.name == "deepspeed":
        return deepspeed_optimizer_state(trainer)
    module = trainer.strategy.unwrapped_model()
    state = trainer.strategy.optimizer.state
    out = {}
    for name, p in module.named_parameters():
        for key, value in sorted(state.get(p, {}).items()):
            out[f"{name}.{key}"] = full(value)
    return out


def _deepspeed_state_piece(optimizer, p: torch.nn.Parameter, key: str, stage: int) -> torch.Tensor:
    """This rank's piece of the AdamW state `key` of `p`, laid out like its fp32 master piece
    (deepspeed_compat.fp32_partition / fragment): ZeRO-3 the partition, ZeRO-1/2 the fragment cut from
    the flat group's state (empty where this rank owns none of `p`)."""
    from trainer.strategies import deepspeed_compat as compat

    if stage == 3:
        return compat.fp32_partition(optimizer, p, key)
    mapping = compat.attribute(p, "_hp_mapping", "ZeRO-1/2 parameter")
    if mapping is None:
        return torch.empty(0)
    flat = compat.attribute(optimizer, "single_partition_of_fp32_groups")[compat.attribute(mapping, "param_group_index")]
    addr = compat.attribute(mapping, "hp_fragment_address")
    return compat.attribute(optimizer, "optimizer").state[flat][key].narrow(0, addr.start, addr.numel)


def deepspeed_optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The AdamW moments of every parameter, cut from the ZeRO optimizer's flat fp32 state the way
    local_params() cuts the master weights, then gathered by the strategy (collective); plus the
    distinct step counts of the flat groups under `steps`."""
    s = trainer.strategy
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        pieces = [_deepspeed_state_piece(s.optimizer, p, key, s.stage) for p in s._params]
        full = s.gather_full_state(pieces)
        if trainer.rank == 0:
            out.update({f"{name}.{key}": full[name] for name in s._names})
    steps = {float(st["step"]) for st in s.optimizer.optimizer.state.values() if "step" in st}
    out["steps"] = torch.tensor(sorted(steps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--then-train", action="store_true", help="after the dump, train as trainer.train does")
    args = ap.parse_args()
    setup_logging(rank=rank_from_env() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    code = 0
    with leave_process_group_on_exit():
        trainer = Trainer(load_config(TrainConfig, args.config))
        try:
            dump = {"step": torch.tensor(trainer.step), "model": trainer.strategy.gather_full_state(),
                    "ema": trainer.strategy.gather_full_state(trainer.ema.shadow),
                    "optim": optimizer_state(trainer),
                    "lr": torch.tensor([g["lr"] for g in trainer.strategy.optimizer.param_groups])}
            if trainer.rank == 0:
                torch.save(dump, args.out)
            if args.then_train:
                code = trainer.train()
        finally:
            trainer.close()
    return code


if __name__ == "__main__":
    exit_process(main())
