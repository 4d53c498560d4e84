"""Checkpoint → one safetensors file of the EMA weights, with the training config in its metadata.

    python -m trainer.export --checkpoint runs/x[/checkpoints/step-001000] --out model.safetensors

single/ddp/fsdp checkpoints hold the EMA by parameter name in their DCP state (`dcp/`) and export in
one process, whatever the number of ranks that wrote them (older single/ddp ones: ema-rank0.pt).
DeepSpeed checkpoints (and fsdp ones from before the EMA moved into DCP) hold one EMA shard per rank;
export them with the strategy that wrote them and the same number of processes, which reassembles
the shards through `strategy.gather_full_state` (the command is printed if you get it wrong):

    torchrun --standalone --nproc_per_node 2 -m trainer.export --checkpoint ... --out model.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from common.config import from_dict, to_dict
from trainer.checkpoint import read_state, require_verified, resolve_checkpoint
from trainer.config import TrainConfig
from trainer.storage import StorageFault, is_out_of_space, write_failed

FORMAT = "vdm-ema-v1"
REPLICATED = ("single", "ddp")


def _metadata(cfg: TrainConfig, state: dict, ckpt_dir: Path) -> dict[str, str]:
    return {"format": FORMAT, "config": json.dumps(to_dict(cfg)), "step": str(state.get("step", "")),
            "text_encoder": state.get("text_encoder", "") or cfg.run.text_encoder, "checkpoint": str(ckpt_dir)}


def ema_state_replicated(ckpt_dir: Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Full EMA state of a single/ddp checkpoint, or of any checkpoint with the EMA in its DCP state
    (fsdp included, whatever its world size: DCP assembles the shards), without any process group."""
    from model.unet import SpaceTimeUNet
    from trainer.checkpoint import has_dcp_ema
    from trainer.strategies import dcp_state
    from trainer.strategies.single import full_state

    model = SpaceTimeUNet(cfg.model)
    if has_dcp_ema(ckpt_dir):
        named = dcp_state.read_full(ckpt_dir, dcp_state.EMA_KEY)
        ema = [named[n] for n, p in model.named_parameters() if p.requires_grad]
    else:  # written before the EMA moved into DCP
        ema = torch.load(ckpt_dir / "ema-rank0.pt", weights_only=True, map_location="cpu")
    return full_state(model, ema)


def _one_process(ckpt_dir: Path, state: dict, cfg: TrainConfig) -> bool:
    """single/ddp replicas and DCP checkpoints with the EMA inside export without a process group."""
    from trainer.checkpoint import has_dcp_ema

    return state.get("strategy", cfg.parallel.strategy) in REPLICATED or has_dcp_ema(ckpt_dir)


def ema_state_sharded(ckpt_dir: Path, cfg: TrainConfig, state: dict) -> dict[str, torch.Tensor] | None:
    """Full EMA state on rank 0 (None elsewhere), reassembled by the strategy that wrote the shards."""
    from model.unet import SpaceTimeUNet
    from trainer.distributed import init_distributed
    from trainer.strategies.base import build_strategy

    dist_env = init_distributed(cfg.parallel.backend)
    want = int(state.get("world_size", 1))
    if dist_env.world_size != want:
        raise SystemExit(
            f"{ckpt_dir} is a {cfg.parallel.strategy} checkpoint sharded over {want} ranks; run the export with "
            f"{want} processes:\n  torchrun --standalone --nproc_per_node {want} -m trainer.export "
            f"--checkpoint {ckpt_dir} --out OUT.safetensors")
    torch.manual_seed(cfg.run.seed)
    strategy = build_strategy(cfg, dist_env)
    strategy.setup(SpaceTimeUNet(cfg.model))
    strategy.load(ckpt_dir)
    ema = torch.load(ckpt_dir / f"ema-rank{dist_env.rank}.pt", weights_only=True, map_location=dist_env.device)
    return strategy.gather_full_state(ema)


def export(checkpoint: str | Path, out: str | Path) -> Path | None:
    """Write `out` (rank 0); returns its path on rank 0, None on other ranks."""
    from safetensors.torch import save_file

    ckpt_dir = resolve_checkpoint(checkpoint)
    state = read_state(ckpt_dir)
    cfg = from_dict(TrainConfig, state["config"])
    require_verified(ckpt_dir, checksums=cfg.run.verify_checkpoints)
    if _one_process(ckpt_dir, state, cfg):
        # launched under torchrun anyway (the command for sharded checkpoints): rank 0 writes
        is_main = int(os.environ.get("RANK", "0")) == 0
        tensors = ema_state_replicated(ckpt_dir, cfg) if is_main else None
    else:
        tensors = ema_state_sharded(ckpt_dir, cfg, state)
        is_main = tensors is not None
    if not is_main:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        save_file(tensors, str(out), metadata=_metadata(cfg, state, ckpt_dir))
    except Exception as e:  # safetensors reports a full disk as its own SafetensorError
        if not isinstance(e, OSError) and not is_out_of_space(e):
            raise
        out.unlink(missing_ok=True)
        raise write_failed("the exported weights to", out, e, f"nothing was exported; {ckpt_dir} is unchanged") from e
    return out


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], TrainConfig, dict[str, str]]:
    """(state dict, training config, metadata) of a file written by `export`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a trainer.export file (metadata format {meta.get('format')!r})")
    return load_file(str(path)), from_dict(TrainConfig, json.loads(meta["config"])), meta


def load_ema_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], TrainConfig, dict[str, str]]:
    """(EMA state dict, training config, metadata) from an exported .safetensors or a single/ddp checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_exported(path)
    ckpt_dir = resolve_checkpoint(path)
    state = read_state(ckpt_dir)
    cfg = from_dict(TrainConfig, state["config"])
    require_verified(ckpt_dir, checksums=cfg.run.verify_checkpoints)
    if not _one_process(ckpt_dir, state, cfg):
        raise ValueError(f"{ckpt_dir} is a sharded {state.get('strategy')} checkpoint: export it first "
                         f"(python -m trainer.export --checkpoint {ckpt_dir} --out model.safetensors, with "
                         f"{state.get('world_size')} processes) and use the .safetensors file")
    return ema_state_replicated(ckpt_dir, cfg), cfg, _metadata(cfg, state, ckpt_dir)


def load_ema_model(path: str | Path, device: str | torch.device = "cpu"):
    """EMA model (eval mode) + config + metadata from an exported .safetensors or a single/ddp checkpoint."""
    from model.unet import SpaceTimeUNet

    tensors, cfg, meta = load_ema_weights(path)
    model = SpaceTimeUNet(cfg.model)
    model.load_state_dict(tensors)
    return model.to(device).eval(), cfg, meta


def load_initial_weights(model: torch.nn.Module, path: str | Path, model_cfg) -> dict[str, str]:
    """Warm start (run.init_from): put another run's EMA weights into a freshly built, not yet
    parallelised model. This is how a run continues on a different number of processes or another
    strategy (sharded checkpoints resume only with their own), or fine-tunes: the weights carry over,
    the optimizer moments, step and data position start afresh. Returns the source's metadata."""
    tensors, src_cfg, meta = load_ema_weights(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # torch's message (chained below) lists every missing and misshapen key
        mine, theirs = to_dict(model_cfg), to_dict(src_cfg.model)
        differ = [f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in mine if theirs.get(k) != mine[k]]
        raise ValueError(f"run.init_from={path}: its weights do not fit this model. Its model config differs "
                         f"in: {'; '.join(differ) or 'nothing'}") from e
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run's out_dir (its latest)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    a = p.parse_args(argv)
    from trainer.distributed import leave_process_group_on_exit

    try:
        with leave_process_group_on_exit():
            out = export(a.checkpoint, a.out)
    except (FileNotFoundError, StorageFault) as e:
        print(f"export: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from trainer.distributed import exit_process

    exit_process(main())
