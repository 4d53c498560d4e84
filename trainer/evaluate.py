"""Evaluate a trained model: synthetic-task accuracy (colour, shape, direction), FVD, and conditional
generation (prediction, interpolation, super-resolution) against held-out truth.

    python -m trainer.evaluate --checkpoint RUN|CKPT|FILE.safetensors [--synthetic] [--extension]
        [--fvd-detector i3d_torchscript.pt|URL --val-shards DIR --fvd-clips 256]
        [--task predict|interpolate|upsample ... --val-shards DIR --task-clips 16 --observed-frames K
         --factor F --synthetic-reader] [--seeds 2 --steps 64 --seed 0] [--set eval.key=value ...]
        [--json metrics.json]

--task (repeatable) gives each held-out clip's observed part to the model (trainer/conditional.py)
and scores the completion against the clip with PSNR and SSIM, next to the task's baseline
(trainer/conditional_eval.py), plus FVD with --fvd-detector and the synthetic reader's colour and
direction check with --synthetic-reader.

The same `Evaluator` runs inside training every `run.eval_every` steps on the EMA weights
(TensorBoard `eval/*`, an `[eval]` line in the log), so a number seen during training is the number
this CLI gives for the same weights. Settings come from the checkpoint's config (`eval:` section,
sampling from `sampling:`), then the flags.

FVD follows the common PyTorch implementations (see trainer/fvd.py): I3D features of real clips
from `data.val_shards` against features of clips generated for the same captions. The extractor
is a TorchScript file the user supplies (path or URL, cached); its name, the clip count and the
seed are reported with the score, because FVDs made with other settings are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from trainer.loaders import loader_factory_or_default


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)  # TensorBoard tag (without "eval/") -> value
    info: dict[str, str] = field(default_factory=dict)  # what makes the numbers comparable
    lines: list[str] = field(default_factory=list)  # human-readable report

    def summary(self) -> str:
        m = self.metrics
        parts = []
        if "colour_acc" in m:
            parts.append(f"colour {m['colour_acc']:.0%} direction {m['direction_acc']:.0%} "
                         f"shape {m['shape_acc']:.0%} colour+direction {m['colour_direction_acc']:.0%}")
        if "extension_direction_acc" in m:
            parts.append(f"extension direction {m['extension_direction_acc']:.0%}")
        for task in ("predict", "interpolate", "upsample"):
            if f"{task}_psnr" in m:
                parts.append(f"{task} PSNR {m[f'{task}_psnr']:.2f} dB (baseline {m[f'{task}_psnr_baseline']:.2f})"
                             + (f" direction {m[f'{task}_direction_acc']:.0%}" if f"{task}_direction_acc" in m else ""))
        if "fvd" in m:
            parts.append(f"FVD {m['fvd']:.2f} ({self.info['fvd_clips']} clips, seed {self.info['seed']}, "
                         f"{self.info['fvd_detector']})")
        return "; ".join(parts)


# A stride between the noise seeds of successive FVD caption batches (a prime, so batch i's seeds
# eval.seed + FVD_BATCH_SEED_STRIDE * i + start never meet another batch's for realistic sizes)
FVD_BATCH_SEED_STRIDE = 7919


class Evaluator:
    """Runs the `eval:` section on a model; keeps what does not change between calls (the text
    encoder, the real clips' FVD statistics) so evaluating every N training steps costs only sampling."""

    def __init__(self, cfg, text_encoder: str = "", device: str | torch.device = "cpu", loader_factory=None):
        self.cfg = cfg
        self.text_encoder_name = text_encoder
        self.device = torch.device(device)
        self._loader_factory = loader_factory
        self._encoder = None
        self._extractor = None
        self._real = None  # (FeatureStats, [(text_emb, text_mask), ...]) of the real clips
        self._task_clips = None  # held-out clips of eval.tasks, read once
        self.examples: dict = {}  # task -> observed / completed / baseline / truth of its first clip (last run)

    @property
    def enabled(self) -> bool:
        return self.cfg.eval.synthetic or bool(self.cfg.eval.fvd_detector) or bool(self.cfg.eval.tasks)

    def check(self) -> None:
        """Fail now, naming the setting, on what would fail at the first evaluation."""
        ev = self.cfg.eval
        if not self.enabled:
            raise ValueError("run.eval_every is set but the eval: section measures nothing: set eval.synthetic=true, "
                             "eval.fvd_detector and/or eval.tasks")
        if ev.seeds < 1 or ev.batch_size < 1 or ev.fvd_clips < 2:
            raise ValueError(f"eval.seeds ({ev.seeds}) and eval.batch_size ({ev.batch_size}) must be >= 1, "
                             f"eval.fvd_clips ({ev.fvd_clips}) >= 2")
        if ev.synthetic:
            self._text_encoder()
        if ev.tasks:
            if not self.cfg.data.val_shards:
                raise ValueError(f"eval.tasks={ev.tasks} needs held-out clips: set data.val_shards")
            for name in ev.tasks:
                self.task(name)
        if ev.fvd_detector:
            if not self.cfg.data.val_shards:
                raise ValueError("eval.fvd_detector needs real clips: set data.val_shards")
            self._feature_extractor()

    def _feature_extractor(self):
        from trainer.fvd import I3DFeatureExtractor

        if self._extractor is None:
            self._extractor = I3DFeatureExtractor(self.cfg.eval.fvd_detector, device=self.device)
        return self._extractor

    def sampling(self):
        """The `sampling:` section with the evaluation's steps (eval.steps, else run.sample_steps)."""
        return self.cfg.sampling.with_overrides(steps=self.cfg.eval.steps or self.cfg.run.sample_steps)

    def sampling_kwargs(self) -> dict:
        return self.sampling().sample_kwargs()

    def run(self, model: torch.nn.Module) -> EvalResult:
        from model.diffusion import GaussianDiffusion

        diffusion = GaussianDiffusion.from_config(self.cfg.diffusion)
        result = EvalResult(info={"seed": str(self.cfg.eval.seed),
                                  "sampling": json.dumps(self.sampling_kwargs(), sort_keys=True)})
        if self.cfg.eval.synthetic:
            self._synthetic(model, diffusion, result)
        if self.cfg.eval.fvd_detector:
            self._fvd(model, diffusion, result)
        if self.cfg.eval.tasks:
            self._tasks(model, diffusion, result)
        return result

    # ------------------------------------------------------------------ conditional tasks
    def task(self, name: str):
        """The `trainer.conditional.Task` `name` with the eval section's factors, for this model."""
        from trainer.conditional import Task

        ev, data = self.cfg.eval, self.cfg.data
        factor = ev.interpolate_factor if name == "interpolate" else ev.upsample_factor
        return Task(name, window=data.num_frames, size=data.image_size, factor=factor,
                    observed_frames=ev.observed_frames)

    def _tasks(self, model, diffusion, result: EvalResult) -> None:
        """Each of eval.tasks on the first eval.task_clips held-out clips; FVD per task with a detector."""
        from trainer.conditional_eval import evaluate_task

        ev = self.cfg.eval
        if self._task_clips is None:
            self._task_clips = list(self._real_clips(ev.task_clips))
        extractor = self._feature_extractor() if ev.fvd_detector else None
        for name in ev.tasks:
            report = evaluate_task(model, diffusion, self.task(name), self._task_clips, sampling=self.sampling(),
                                   seed=ev.seed, batch=ev.batch_size, captions=ev.task_captions,
                                   reader=ev.task_reader, extractor=extractor, device=self.device)
            result.metrics.update(report.metrics)
            result.info.update(report.info)
            result.lines += report.lines
            self.examples[name] = report.examples

    # ------------------------------------------------------------------ synthetic task
    def _text_encoder(self):
        if self._encoder is None:
            from trainer.generate import load_text_encoder

            if not self.text_encoder_name:
                raise ValueError("eval.synthetic needs a text encoder: the checkpoint names none; set "
                                 "run.text_encoder (or pass --text-encoder)")
            self._encoder = load_text_encoder(self.text_encoder_name, self.cfg.data.max_text_len)
        return self._encoder

    def _synthetic(self, model, diffusion, result: EvalResult) -> None:
        from trainer.synthetic_eval import evaluate_synthetic

        cfg, ev = self.cfg, self.cfg.eval
        report = evaluate_synthetic(model, diffusion, self._text_encoder(), frames=cfg.data.num_frames,
                                    size=cfg.data.image_size, seeds=ev.seeds, sampling=self.sampling(),
                                    extension=ev.extension, batch=ev.batch_size, seed=ev.seed, device=self.device)
        m = report.metrics
        result.metrics.update({"colour_acc": m["colour"], "direction_acc": m["direction"], "shape_acc": m["shape"],
                               "colour_direction_acc": m["colour_and_direction"], "axis_acc": m["axis"],
                               "direction_word_effect": report.word_effect["direction_word_effect"],
                               "colour_word_effect": report.word_effect["colour_word_effect"],
                               "synthetic_seconds": report.seconds,
                               "synthetic_clips_per_s": report.clips / max(report.seconds, 1e-9)})
        if report.extension:
            result.metrics["extension_direction_acc"] = report.extension["direction_after_boundary"]
            result.metrics["extension_whole_direction_acc"] = report.extension["direction"]
        result.info["synthetic_prompts"] = str(len(report.prompts))
        if ev.motion_kinds:
            from trainer.synthetic_eval import evaluate_motion_kinds

            kinds, line = evaluate_motion_kinds(model, diffusion, self._text_encoder(), frames=cfg.data.num_frames,
                                                size=cfg.data.image_size, seeds=ev.seeds, sampling=self.sampling(),
                                                batch=ev.batch_size, seed=ev.seed, device=self.device)
            result.metrics.update({f"kinds_{name.replace('/', '_').replace(' ', '_')}_acc": v
                                   for name, v in kinds.items()})
            result.lines.append(line)
        result.lines += [report.table(),
                         f"synthetic: {report.clips} clips in {report.seconds:.1f} s "
                         f"({report.clips / max(report.seconds, 1e-9):.2f} clips/s)"]

    # ------------------------------------------------------------------ FVD
    def _real_clips(self, count: int | None = None):
        """Batches (video, text_emb, text_mask) of the first `count` (default eval.fvd_clips) clips of
        data.val_shards (video frames only)."""
        cfg = self.cfg
        if not cfg.data.val_shards:
            raise ValueError("held-out clips needed (FVD, eval.tasks): set data.val_shards (or pass --val-shards)")
        factory = loader_factory_or_default(self._loader_factory)
        val_cfg = type(cfg.data)(**{**cfg.data.__dict__, "shards": cfg.data.val_shards, "num_image_frames": 0})
        left = cfg.eval.fvd_clips if count is None else count
        for batch in factory(val_cfg, rank=0, world_size=1, train=False):
            take = min(left, batch["video"].shape[0])
            yield (batch["video"][:take, :, :cfg.data.num_frames], batch["text_emb"][:take],
                   batch["text_mask"][:take].bool())
            left -= take
            if left <= 0:
                return

    def _fvd(self, model, diffusion, result: EvalResult) -> None:
        from trainer.fvd import FeatureStats, fvd_from_stats
        from trainer.generate import generate

        cfg = self.cfg
        extractor = self._feature_extractor()
        if self._real is None:
            real, captions = FeatureStats(), []
            for video, emb, mask in self._real_clips():
                real.update(extractor.features(video.to(self.device)))
                captions.append((emb, mask))
            self._real = (real, captions)
        real, captions = self._real
        t0 = time.perf_counter()
        fake = FeatureStats()
        for i, (emb, mask) in enumerate(captions):
            for start in range(0, emb.shape[0], cfg.eval.batch_size):
                sl = slice(start, start + cfg.eval.batch_size)
                videos = generate(model, diffusion, emb[sl], mask[sl], frames=cfg.data.num_frames,
                                  height=cfg.data.image_size, width=cfg.data.image_size,
                                  channels=cfg.model.in_channels, seed=cfg.eval.seed + FVD_BATCH_SEED_STRIDE * i + start,
                                  device=self.device, sampling=self.sampling())
                fake.update(extractor.features(videos))
        seconds = time.perf_counter() - t0
        result.metrics.update({"fvd": fvd_from_stats(real, fake), "fvd_seconds": seconds,
                               "fvd_clips_per_s": fake.num / max(seconds, 1e-9)})
        result.info.update({"fvd_clips": str(fake.num), "fvd_detector": extractor.name,
                            "fvd_real": cfg.data.val_shards})
        result.lines.append(f"FVD {result.metrics['fvd']:.3f}: {fake.num} generated vs {real.num} real clips of "
                            f"{cfg.data.val_shards}, seed {cfg.eval.seed}, extractor {extractor.name}; "
                            f"sampling took {seconds:.1f} s ({fake.num / max(seconds, 1e-9):.2f} clips/s)")


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported .safetensors, a run dir or a checkpoint dir")
    p.add_argument("--synthetic", action="store_true", help="score the synthetic prompt grid (eval.synthetic)")
    p.add_argument("--extension", action="store_true", help="also score 2x-length extension (eval.extension)")
    p.add_argument("--fvd-detector", help="TorchScript I3D file or URL (eval.fvd_detector)")
    p.add_argument("--val-shards", help="real clips for FVD (data.val_shards)")
    p.add_argument("--fvd-clips", type=int, help="eval.fvd_clips")
    p.add_argument("--task", action="append", choices=["predict", "interpolate", "upsample"],
                   help="conditional task scored on --val-shards (repeatable; eval.tasks)")
    p.add_argument("--task-clips", type=int, help="held-out clips per task (eval.task_clips)")
    p.add_argument("--observed-frames", type=int, help="predict: frames observed (eval.observed_frames)")
    p.add_argument("--factor", type=int, help="interpolate and upsample factor (eval.interpolate_factor, "
                   "eval.upsample_factor)")
    p.add_argument("--examples", help="write each task's first held-out clip (observed, completed, truth) as .npy here")
    p.add_argument("--synthetic-reader", action="store_true",
                   help="read colour/direction of the completions vs the truth (eval.task_reader)")
    p.add_argument("--seeds", type=int, help="copies of the synthetic prompt grid (eval.seeds)")
    p.add_argument("--steps", type=int, help="sampling steps (eval.steps)")
    p.add_argument("--seed", type=int, help="noise seed (eval.seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config override, e.g. sampling.guidance_weight=2")
    p.add_argument("--text-encoder", help="encoder for the synthetic prompts (default: the model's own)")
    p.add_argument("--json", help="write metrics and settings to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _overrides(a: argparse.Namespace) -> list[str]:
    flags = {"eval.synthetic": a.synthetic or None, "eval.extension": a.extension or None,
             "eval.fvd_detector": a.fvd_detector, "data.val_shards": a.val_shards, "eval.fvd_clips": a.fvd_clips,
             "eval.seeds": a.seeds, "eval.steps": a.steps, "eval.seed": a.seed,
             "eval.tasks": f"[{','.join(a.task)}]" if a.task else None, "eval.task_clips": a.task_clips,
             "eval.observed_frames": a.observed_frames, "eval.interpolate_factor": a.factor,
             "eval.upsample_factor": a.factor, "eval.task_reader": a.synthetic_reader or None}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + a.overrides


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common.config import ConfigError, apply_overrides, from_dict, to_dict
    from trainer.config import TrainConfig
    from trainer.export import load_ema_model
    from trainer.storage import StorageFault

    try:
        model, cfg, meta = load_ema_model(a.checkpoint, a.device)
        cfg = from_dict(TrainConfig, apply_overrides(to_dict(cfg), _overrides(a), TrainConfig))
    except (FileNotFoundError, ValueError, ConfigError, StorageFault) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    evaluator = Evaluator(cfg, a.text_encoder or meta.get("text_encoder") or cfg.run.text_encoder, a.device)
    if not evaluator.enabled:
        print("evaluate: nothing to evaluate: pass --synthetic, --fvd-detector and/or --task (or set eval.* in "
              "the config)", file=sys.stderr)
        return 2
    try:
        result = evaluator.run(model)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    for line in result.lines:
        print(line)
    print(f"[eval] {result.summary()}")
    if a.examples and evaluator.examples:
        from trainer.conditional_eval import write_examples

        write_examples(evaluator.examples, {name: evaluator.task(name) for name in evaluator.examples}, a.examples)
        print(f"wrote one held-out clip per task to {a.examples}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": str(a.checkpoint), "metrics": result.metrics, "info": result.info}, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
