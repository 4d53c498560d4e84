"""Topology-independent checkpoints for single, ddp and fsdp: model, AdamW state and EMA in one DCP.

Everything is keyed by parameter name (FQN), never by rank or by the optimizer's parameter index:
`get_state_dict` names the model and optimizer entries, and the EMA is stored as `ema.<param name>`,
as a plain tensor for replicas and as a DTensor with the parameter's sharding under FSDP2. DCP keeps
each tensor's global shape and the offset of every saved piece, so a load reads whatever slice the
loading rank owns: a checkpoint written by N fsdp ranks loads on M fsdp ranks, by ddp or by one
process, and the other way round, bitwise (it only copies bytes).

Layout: `<ckpt>/dcp/` (`.metadata` + one `__{rank}_0.distcp` per writing rank; replicated tensors are
written once). The loss scalers stay beside it in each strategy's own small file.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer import async_write

DCP_DIR = "dcp"
EMA_KEY = "ema"


def has_dcp(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DCP_DIR / ".metadata").is_file()


def _no_dist() -> bool:
    """One process without a process group (single, ddp on one rank): DCP must not try collectives."""
    return not (dist.is_available() and dist.is_initialized())


# DCP warns on every save/load without a process group that it assumes one process: that is exactly
# what we mean (single, or a read for export/tests), so the warning is noise in run logs. A filter for
# the whole process, since a background save warns from its writer thread after any context has ended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def saved_keys(ckpt_dir: Path) -> set[str]:
    """Flattened keys in the checkpoint (`model.<fqn>`, `optim.state.<fqn>.exp_avg`, `ema.<fqn>`, ...)."""
    reader = dcp.FileSystemReader(str(Path(ckpt_dir) / DCP_DIR))
    return set(reader.read_metadata().state_dict_metadata)


def has_ema(ckpt_dir: Path) -> bool:
    """Older fsdp checkpoints kept the EMA per rank in ema-rank{r}.pt instead."""
    return any(k.startswith(EMA_KEY + ".") for k in saved_keys(ckpt_dir))


def save(ckpt_dir: Path, module: nn.Module, optimizer, ema: dict[str, Tensor] | None, *,
         background_group: dist.ProcessGroup | None = None, background_stager=None,
         background: bool = False) -> Future:
    """Collective over the ranks of the process group (if any). `background`: the state is copied to
    CPU memory now (by `background_stager`, reused across saves; None: a fresh one) and written by a
    DCP thread that coordinates over `background_group` (a group of its own: the training loop's
    collectives on the default group must not interleave with it);
    the returned future completes when this rank's files and, on rank 0, the metadata are written."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state[EMA_KEY] = ema
    checkpoint_id = str(Path(ckpt_dir) / DCP_DIR)
    if background:
        return dcp.async_save(state, checkpoint_id=checkpoint_id, process_group=background_group,
                              async_stager=background_stager, no_dist=_no_dist())
    dcp.save(state, checkpoint_id=checkpoint_id, no_dist=_no_dist())
    return async_write.done()


def save_strategy(strategy, ckpt_dir: Path, ema: list[Tensor] | None, background: bool) -> Future:
    """`save` of a strategy's module, optimizer and EMA shadow (named by parameter)."""
    named = strategy.named_ema(ema) if ema is not None else None
    if not background:
        return save(ckpt_dir, strategy.module, strategy.optimizer, named)
    return save(ckpt_dir, strategy.module, strategy.optimizer, named, background=True,
                background_group=strategy.background_group(), background_stager=strategy.background_stager())


def load_strategy(strategy, ckpt_dir: Path, ema: list[Tensor] | None) -> bool:
    """`load` into a strategy's module and optimizer, and its EMA shadow (in place) when the checkpoint
    holds one; returns whether it did."""
    named = strategy.named_ema(ema) if ema is not None else None
    found = load(ckpt_dir, strategy.module, strategy.optimizer, named)
    if found:
        copy_into(ema, list(named.values()))
    return found


def load(ckpt_dir: Path, module: nn.Module, optimizer, ema: dict[str, Tensor] | None) -> bool:
    """Collective. Loads model and optimizer in place and the EMA into `ema`'s tensors (which must share
    storage with the live shadow, or be copied back by the caller). Returns whether the checkpoint
    held an EMA (False: an older checkpoint with per-rank EMA files)."""
    keys = saved_keys(ckpt_dir)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    saved_optim = _only_saved_state(optim_sd, keys)
    state = {"model": model_sd, "optim": saved_optim}
    found_ema = ema is not None and any(k.startswith(EMA_KEY + ".") for k in keys)
    if found_ema:
        state[EMA_KEY] = ema
    dcp.load(state, checkpoint_id=str(Path(ckpt_dir) / DCP_DIR), no_dist=_no_dist())
    set_model_state_dict(module, state["model"])  # strict: every key of the model must be there
    # not strict for the optimizer only when some parameter had no state yet when it was saved
    partial = len(saved_optim["state"]) < len(optim_sd["state"])
    set_optimizer_state_dict(module, optimizer, state["optim"], options=StateDictOptions(strict=not partial))
    return found_ema


def _only_saved_state(optim_sd: dict, keys: set[str]) -> dict:
    """Drop the optimizer state of parameters the saved run never stepped (no gradient yet, e.g. the
    null text embedding before the first dropped caption): `get_state_dict` initialises state for
    every parameter, DCP would refuse the missing keys, and AdamW must not start those from step 1."""
    state = {fqn: s for fqn, s in optim_sd["state"].items()
             if all(f"optim.state.{fqn}.{name}" in keys for name in s)}
    return {**optim_sd, "state": state}


@torch.no_grad()
def copy_into(dst: list[Tensor], src: list[Tensor]) -> None:
    """dst[i] <- src[i] (local shards of DTensors); a no-op copy where DCP already filled dst in place."""
    for d, v in zip(dst, src):
        v = v.to_local() if hasattr(v, "to_local") else v
        if v.data_ptr() != d.data_ptr():
            d.copy_(v)


def read_full(ckpt_dir: Path, prefix: str) -> dict[str, Tensor]:
    """Full (unsharded) CPU tensors of one part of a checkpoint (`model`, `ema`, or `optim.state`),
    read in this process without any process group, whatever sharding or world size wrote them.
    For export, evaluation and tests."""
    reader = dcp.FileSystemReader(str(Path(ckpt_dir) / DCP_DIR))
    meta = reader.read_metadata().state_dict_metadata
    start = prefix + "."
    flat = {k[len(start):]: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in meta.items() if k.startswith(start) and hasattr(m, "size")}
    if not flat:
        raise KeyError(f"{ckpt_dir}: no '{prefix}' tensors in {DCP_DIR}/")
    # DCP flattens nested dicts with '.', so {prefix: {rest: t}} reads the keys `prefix.rest` back
    dcp.load({prefix: flat}, storage_reader=reader, no_dist=True)
    return flat
