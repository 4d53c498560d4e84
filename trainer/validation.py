"""What the loop runs between steps on its own schedules, one small class each: the validation loss
(`Validator`, run.val_every), EMA samples to TensorBoard (`TrainingSamples`, run.sample_every) and the
`eval:` section on the EMA weights (`InLoopEvaluation`, run.eval_every). `PeriodicChecks` runs the
due ones after a step, in that order.

Each takes the parts it reads (config, strategy, EMA, diffusion, metrics) rather than the trainer, so
it is built and tested alone. A new periodic check is a class with `due(step)` and `run(step)` added
to the list in trainer/builder.py; a new evaluation task belongs in trainer/evaluate.py's Evaluator,
whose metrics, lines and info `InLoopEvaluation` logs whatever they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from trainer import checkpoint as ckpt
from trainer.batches import Conditioning
from trainer.loaders import loader_factory_or_default
from trainer.metrics import band_centers, band_edges, band_labels, band_training_weights
from trainer.seeding import preserved_rng

SALT_VAL_NOISE = 4242  # the fixed t and noise of the validation loss (same every evaluation)


class PeriodicCheck(Protocol):
    def due(self, step: int) -> bool: ...

    def run(self, step: int): ...


def every(interval: int, step: int) -> bool:
    return interval > 0 and step % interval == 0


def ema_model_on_rank0(strategy, ema, model_cfg, rank: int, device):
    """The EMA weights as a plain SpaceTimeUNet on rank 0 (None elsewhere); a collective call."""
    from model.unet import SpaceTimeUNet

    full = strategy.gather_full_state(ema.shadow)  # collective
    if rank != 0:
        return None
    model = SpaceTimeUNet(model_cfg)
    model.load_state_dict(full)
    return model.to(device)


class Validator:
    """Loss on the held-out shards (data.val_shards) at fixed log-SNR band centres with fixed noise:
    comparable across steps and runs. Every rank evaluates the same batches (sharded models need all
    ranks in each forward), so no rank can run out of batches before the others.

    The model is called as in training (`conditioning`: the trainer's, without caption dropout), with
    the conditions measured on the clip (the measured motion), so the loss is comparable with the
    training loss; the model's auxiliary losses are logged as val/<name> (val/motion_loss)."""

    def __init__(self, cfg, strategy, diffusion, metrics, device, loader_factory=None,
                 conditioning: Conditioning | None = None):
        self.cfg, self.strategy, self.diffusion, self.metrics = cfg, strategy, diffusion, metrics
        self.device = torch.device(device)
        self.conditioning = conditioning or Conditioning(self.device)
        self._loader_factory = loader_factory
        self.edges = band_edges(cfg.diffusion.logsnr_min, cfg.diffusion.logsnr_max)
        self.weights = band_training_weights(self.edges, diffusion.t_of_logsnr)
        self._batches: list[dict] | None = None

    def due(self, step: int) -> bool:
        return every(self.cfg.run.val_every, step) and bool(self.cfg.data.val_shards)

    def _val_batches(self) -> list[dict]:
        """The first run.val_batches batches of the validation shards, read once and kept."""
        if self._batches is None:
            cfg = self.cfg
            val_cfg = type(cfg.data)(**{**cfg.data.__dict__, "shards": cfg.data.val_shards})
            loader = loader_factory_or_default(self._loader_factory)(val_cfg, rank=0, world_size=1, train=False)
            batches = []
            for batch in loader:
                batches.append(batch)
                if len(batches) >= max(1, cfg.run.val_batches):
                    break
            self._batches = batches
            if not batches:
                self.metrics.print(f"[val] no batches in {cfg.data.val_shards}; validation disabled")
        return self._batches

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        cfg, s, dev = self.cfg, self.strategy, self.device
        batches = self._val_batches()
        if not batches:
            return {}
        centers = band_centers(self.edges)
        labels = band_labels(self.edges)
        totals = [0.0] * len(centers)
        aux: dict[str, float] = {}  # the model's auxiliary losses, summed over batches and bands
        s.model.eval()
        try:
            with preserved_rng():
                gen = torch.Generator().manual_seed(cfg.run.seed + SALT_VAL_NOISE)
                for batch in batches:
                    x = batch["video"].float().to(dev)
                    cond = self.conditioning.for_training(batch, x, drop_captions=False)
                    model = self.conditioning.denoiser(s.forward)
                    for i, c in enumerate(centers):
                        noise = torch.randn(x.shape, generator=gen).to(dev)
                        t = self.diffusion.t_of_logsnr(torch.full((x.shape[0],), c)).to(dev)
                        with s.autocast():
                            per_sample, _ = self.diffusion.loss_terms(model, x, t=t, noise=noise, **cond)
                        totals[i] += float(per_sample.mean())
                        for name, value in model.values().items():
                            aux[name] = aux.get(name, 0.0) + value
        finally:
            s.model.train()
        n = len(batches)
        result = {f"val/loss_band/{label}": tot / n for label, tot in zip(labels, totals)}
        result.update({f"val/{name}": total / (n * len(centers)) for name, total in aux.items()})
        result["val/loss"] = sum(w * tot / n for w, tot in zip(self.weights, totals))
        result["val/loss_band_mean"] = sum(totals) / (n * len(totals))
        self.metrics.scalars(result, step)
        self.metrics.print(f"[val] step {step}: loss {result['val/loss']:.4f}")
        return result


class TrainingSamples:
    """EMA-weight samples for run.sample_prompts → TensorBoard (samples/<i>) and out_dir/samples/.
    Collective (the EMA gather); rank 0 samples while the others wait at a barrier."""

    def __init__(self, cfg, strategy, ema, diffusion, metrics, device, rank: int, text_encoder: str = ""):
        self.cfg, self.strategy, self.ema, self.diffusion, self.metrics = cfg, strategy, ema, diffusion, metrics
        self.device, self.rank, self.text_encoder = device, rank, text_encoder
        self.out_dir = Path(cfg.run.out_dir)
        self._prompt_cache = None

    def due(self, step: int) -> bool:
        return every(self.cfg.run.sample_every, step) and bool(self.cfg.run.sample_prompts)

    def _prompts(self):
        if self._prompt_cache is None:
            from trainer.generate import encode_prompts, load_text_encoder

            if not self.text_encoder:
                raise RuntimeError("run.sample_prompts needs a text encoder: set run.text_encoder or use shards "
                                   "whose index.json names one")
            enc = load_text_encoder(self.text_encoder, self.cfg.data.max_text_len)
            self._prompt_cache = encode_prompts(enc, list(self.cfg.run.sample_prompts))
        return self._prompt_cache

    def run(self, step: int) -> list[Path]:
        from trainer.generate import generate
        from trainer.video_io import to_uint8_frames, write_gif, write_mp4

        model = ema_model_on_rank0(self.strategy, self.ema, self.cfg.model, self.rank, self.device)
        written: list[Path] = []
        if self.rank == 0:
            cfg = self.cfg
            with preserved_rng():
                emb, mask = self._prompts()
                videos = generate(model, self.diffusion, emb, mask, frames=cfg.data.num_frames,
                                  height=cfg.data.image_size, width=cfg.data.image_size,
                                  channels=cfg.model.in_channels, sampling=cfg.sampling,
                                  steps=cfg.run.sample_steps, seed=cfg.run.seed, device=self.device)
                del model
            out = self.out_dir / "samples" / ckpt.step_dir_name(step)
            for i, (video, prompt) in enumerate(zip(videos, cfg.run.sample_prompts)):
                frames = to_uint8_frames(video)
                self.metrics.video(f"samples/{i}", frames, step, upscale=max(1, 64 // frames.shape[1]))
                slug = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:40]
                try:
                    written += [write_mp4(out / f"{i}_{slug}.mp4", frames),
                                write_gif(out / f"{i}_{slug}.gif", frames)]
                except OSError as e:  # the loop stops every rank at its next check (Metrics.fault)
                    self.metrics.record_fault("sample videos to", out, e)
                    break
            self.metrics.text("samples/prompts", "\n".join(f"{i}: {p}" for i, p in
                                                          enumerate(cfg.run.sample_prompts)), step)
            self.metrics.print(f"[samples] step {step}: {len(written) // 2} videos in {out}")
            self.metrics.flush()
        self.strategy.barrier()
        return written


class InLoopEvaluation:
    """run.eval_every: the `eval:` section (trainer.evaluate.Evaluator, rank 0 only) on the EMA weights
    → TensorBoard eval/*, an [eval] line and out_dir/eval_log.jsonl. Collective (the EMA gather);
    rank 0 evaluates while the others wait at a barrier."""

    def __init__(self, cfg, strategy, ema, metrics, device, rank: int, evaluator=None):
        self.cfg, self.strategy, self.ema, self.metrics = cfg, strategy, ema, metrics
        self.device, self.rank, self.evaluator = device, rank, evaluator
        self.out_dir = Path(cfg.run.out_dir)

    @staticmethod
    def scheduled(cfg) -> bool:
        """A run too short to reach its first evaluation needs no evaluator (nor its encoder/detector)."""
        return 0 < cfg.run.eval_every <= cfg.run.steps

    @classmethod
    def for_run(cls, cfg, strategy, ema, metrics, device, rank: int, text_encoder: str = "", loader_factory=None):
        """Every rank takes part (the EMA gather is collective); rank 0 gets the run's Evaluator, checked
        now so that a missing detector or val shards fail before hours of training rather than at the
        first evaluation."""
        evaluator = None
        if cls.scheduled(cfg) and rank == 0:
            from trainer.evaluate import Evaluator

            evaluator = Evaluator(cfg, text_encoder, device, loader_factory=loader_factory)
            evaluator.check()
        return cls(cfg, strategy, ema, metrics, device, rank, evaluator)

    def due(self, step: int) -> bool:
        return self.scheduled(self.cfg) and step % self.cfg.run.eval_every == 0

    def run(self, step: int) -> dict[str, float]:
        model = ema_model_on_rank0(self.strategy, self.ema, self.cfg.model, self.rank, self.device)
        scalars: dict[str, float] = {}
        if self.rank == 0:
            with preserved_rng():
                result = self.evaluator.run(model)
            del model
            scalars = {f"eval/{k}": v for k, v in result.metrics.items()}
            self.metrics.scalars(scalars, step)
            self.metrics.text("eval/settings", json.dumps(result.info, sort_keys=True), step)
            for line in result.lines:
                self.metrics.print(line)
            self.metrics.print(f"[eval] step {step}: {result.summary()}")
            try:
                with open(self.out_dir / "eval_log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **result.metrics, "info": result.info}) + "\n")
            except OSError as e:
                self.metrics.record_fault("the evaluation log", self.out_dir / "eval_log.jsonl", e)
            self.metrics.flush()
        self.strategy.barrier()
        return scalars


class PeriodicChecks:
    """The checks run after each step, in order: validation, samples, evaluation (each when due)."""

    def __init__(self, validator: Validator, samples: TrainingSamples, evaluation: InLoopEvaluation,
                 extra: Sequence[PeriodicCheck] = ()):
        self.validator, self.samples, self.evaluation = validator, samples, evaluation
        self.checks: list[PeriodicCheck] = [validator, samples, evaluation, *extra]

    def after_step(self, step: int) -> None:
        for check in self.checks:
            if check.due(step):
                check.run(step)
