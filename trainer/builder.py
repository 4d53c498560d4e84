"""Assembling a ready trainer: every start-up side effect, in the one order that works.

`build_parts(cfg)` reads top to bottom as what happens before the first step. The order matters:
- the model is built with the same seed on every rank (identical initial weights), warm-started only
  when no checkpoint will be resumed, and compiled per block before the strategy wraps the blocks;
- the EMA is built from the wrapped (maybe sharded) parameters;
- each rank's own RNG streams are seeded before the resume, which restores them where the checkpoint
  has this rank's (ranks the saved run did not have keep the fresh seeds);
- the evaluator and the sampler need the text encoder, which a resumed checkpoint may name;
- the checkpoint to resume is chosen before anything is built (the newest that verifies, the same on
  every rank), and a checkpoint that still fails to load sends the whole build round again without
  it: a half-loaded model, optimizer or EMA is thrown away, never trained on.
trainer/loop.py's `Trainer` takes the parts and only steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.conditioning import aux_loss_weights, clip_conditions
from trainer.batches import Batches, BatchHook, Conditioning, StaticTextLength
from trainer.callbacks import Callbacks, load_callbacks
from trainer.checkpoint_manager import CheckpointManager, ResumeLoadFailed, choose_resume, warm_start
from trainer.config import TrainConfig
from trainer.distributed import DistEnv, init_distributed
from trainer.ema import EMA
from trainer.loaders import loader_factory_or_default
from trainer.metrics import Metrics
from trainer.seeding import seed_everything, seed_rank_streams
from trainer.step_control import TrainState
from trainer.strategies.base import build_strategy
from trainer.throughput import Throughput
from trainer.validation import InLoopEvaluation, PeriodicChecks, TrainingSamples, Validator


@dataclass
class TrainerParts:
    """What a ready trainer is made of (trainer/loop.py's Trainer exposes each under the same name)."""

    cfg: TrainConfig
    dist: DistEnv
    metrics: Metrics
    strategy: object  # trainer.strategies.base.Strategy, set up with the model
    compiled: object | None  # trainer.compile.Compiled when run.compile
    diffusion: object  # model.diffusion.GaussianDiffusion
    ema: EMA
    loader: object
    batches: Batches
    batch_hooks: list[BatchHook]
    conditioning: Conditioning
    state: TrainState
    callbacks: Callbacks
    checkpoints: CheckpointManager
    resumed_from: Path | None
    checks: PeriodicChecks
    throughput: Throughput


def check_settings(cfg: TrainConfig) -> None:
    """Combinations of settings the loop cannot honour, refused before anything is built."""
    if cfg.optim.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {cfg.optim.grad_accum}")


def gpu_settings(cfg: TrainConfig, device: torch.device) -> None:
    """Free speed on CUDA, nothing changed on CPU: fp32 runs may use TF32 tensor cores for matmuls
    and convolutions (10-bit mantissa products, fp32 accumulation: the usual trade for training;
    set run.precision to bf16 for more). Fused AdamW and pinned loader memory are set where the
    optimizer and the loader are built (trainer.strategies.base, data_pipeline.loader)."""
    if device.type == "cuda" and cfg.run.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def model_conditioning(cfg: TrainConfig, device: torch.device, caption_dropout: float | None = None) -> Conditioning:
    """What the step conditions on and adds to its loss for this model configuration: the caption (with
    run.caption_dropout unless given), the conditions measured on the clip, the auxiliary losses' weights."""
    dropout = cfg.run.caption_dropout if caption_dropout is None else caption_dropout
    return Conditioning(device, dropout, clip_conditions(cfg.model), aux_loss_weights(cfg.model))


def build_model(cfg: TrainConfig, metrics: Metrics, *, warm: bool):
    """The bare model, the same on every rank (seeded), warm-started from run.init_from when `warm`,
    compiled per block when asked (trainer/compile.py). Returns (model, Compiled | None)."""
    from model.unet import SpaceTimeUNet

    seed_everything(cfg.run.seed)
    model = SpaceTimeUNet(cfg.model)
    if warm:
        warm_start(model, cfg.run.init_from, cfg.model, metrics)
    compiled = None
    if cfg.run.compile:
        from trainer.compile import compile_blocks

        compiled = compile_blocks(model, cfg.run.compile_backend, cfg.run.compile_mode or None)
    return model, compiled


def train_loader(cfg: TrainConfig, dist: DistEnv, loader_factory=None):
    """The training loader also gets optim.grad_accum: with data.batch_size and the world size it makes
    the global batch, the unit in which the global sample sequence is cut into steps.
    loader_factory(cfg.data, rank=, world_size=, train=[, grad_accum=]) defaults to
    data_pipeline.loader.build_loader."""
    factory = loader_factory_or_default(loader_factory)
    return factory(cfg.data, rank=dist.rank, world_size=dist.world_size, train=True, grad_accum=cfg.optim.grad_accum)


def check_text_dim(cfg: TrainConfig, loader) -> None:
    text_dim = getattr(loader, "text_dim", None)
    if text_dim is not None and int(text_dim) != cfg.model.text_dim:
        raise ValueError(f"the shards in {cfg.data.shards} hold {text_dim}-d text embeddings but "
                         f"model.text_dim is {cfg.model.text_dim}; set model.text_dim={text_dim}")


def shard_encoder_name(shards_dir: str) -> str | None:
    """The text encoder named in a shard directory's index.json (None if there is none)."""
    import json

    index = Path(shards_dir) / "index.json" if shards_dir else None
    if index is None or not index.is_file():
        return None
    return (json.loads(index.read_text()).get("encoder") or {}).get("name")


def text_encoder_name(cfg: TrainConfig, loader) -> str:
    """run.text_encoder, else the one the shards were embedded with (the loader's index also covers
    remote shards, URLs and brace patterns, that Path() cannot read), else ""."""
    loader_index = getattr(loader, "index", None)
    return (cfg.run.text_encoder or getattr(loader_index, "encoder_name", "")
            or shard_encoder_name(cfg.data.shards) or "")


def batch_hooks(cfg: TrainConfig, compiled, throughput: Throughput) -> list[BatchHook]:
    """What each loader batch goes through before the step: captions padded to one length for a
    compiled model (every new length would recompile), then the FLOP count at the first batch."""
    hooks: list[BatchHook] = [StaticTextLength(cfg.data.max_text_len)] if compiled is not None else []
    return hooks + [throughput.flops_hook()]


def build_parts(cfg: TrainConfig, dist_env: DistEnv | None = None, loader_factory=None) -> TrainerParts:
    """Every start-up step of a run, in order (see the module docstring for why this order)."""
    dist = dist_env or init_distributed(cfg.parallel.backend)
    metrics = Metrics(Path(cfg.run.out_dir), enabled=dist.rank == 0)
    check_settings(cfg)
    gpu_settings(cfg, dist.device)
    tried: list[tuple[str, str]] = []  # (checkpoint name, why it failed to load)
    while True:
        # a rerun resumes from it, after the strategy is set up
        latest = choose_resume(cfg, dist.world_size, dist.rank, metrics, tried)
        try:
            return _build_from(cfg, dist, metrics, latest, loader_factory)
        except ResumeLoadFailed as e:
            if cfg.run.resume_strict:
                raise
            tried.append((e.ckpt_dir.name, e.why))
            metrics.print(f"[resume] WARNING: {e}; building the trainer again without it")


def _build_from(cfg: TrainConfig, dist: DistEnv, metrics: Metrics, latest: Path | None, loader_factory) -> TrainerParts:
    """The parts from the model on, resumed from `latest` (None: a new run)."""
    from model.diffusion import GaussianDiffusion

    model, compiled = build_model(cfg, metrics, warm=latest is None)
    strategy = build_strategy(cfg, dist)
    strategy.setup(model)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    ema = EMA(strategy.local_params(), cfg.run.ema_decay)
    loader = train_loader(cfg, dist, loader_factory)
    check_text_dim(cfg, loader)
    state = TrainState(text_encoder=text_encoder_name(cfg, loader))
    seed_rank_streams(cfg.run.seed, dist.rank)
    callbacks = load_callbacks(cfg.run.callbacks)
    checkpoints = CheckpointManager(cfg, strategy, ema, loader, state, metrics, dist.rank)
    resumed_from = checkpoints.resume(latest)
    device, rank = dist.device, dist.rank
    checks = PeriodicChecks(
        Validator(cfg, strategy, diffusion, metrics, device, loader_factory=loader_factory,
                  conditioning=model_conditioning(cfg, device, caption_dropout=0.0)),
        TrainingSamples(cfg, strategy, ema, diffusion, metrics, device, rank, text_encoder=state.text_encoder),
        InLoopEvaluation.for_run(cfg, strategy, ema, metrics, device, rank, text_encoder=state.text_encoder,
                                 loader_factory=loader_factory))
    throughput = Throughput(cfg, device, metrics, state, strategy, compiled=compiled,
                            build_probe_loader=lambda: train_loader(cfg, dist, loader_factory))
    return TrainerParts(
        cfg=cfg, dist=dist, metrics=metrics, strategy=strategy, compiled=compiled, diffusion=diffusion, ema=ema,
        loader=loader, batches=Batches(loader), batch_hooks=batch_hooks(cfg, compiled, throughput),
        conditioning=model_conditioning(cfg, device),
        state=state, callbacks=callbacks, checkpoints=checkpoints, resumed_from=resumed_from, checks=checks,
        throughput=throughput)
