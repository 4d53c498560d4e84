"""trainer.validation on its own: the validation loss, training samples and in-loop evaluation, each
built from a real single-process strategy around a tiny U-Net, a real EMA and metrics, without a
Trainer (the evaluator is a stand-in here; trainer.evaluate has its own tests)."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import UNetConfig
from model.diffusion import GaussianDiffusion
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.ema import EMA
from trainer.evaluate import EvalResult
from trainer.metrics import Metrics, band_labels
from trainer.validation import InLoopEvaluation, PeriodicChecks, TrainingSamples, Validator

CPU = DistEnv(0, 1, 0, torch.device("cpu"), None)


def _cfg(tmp_path, **run) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = UNetConfig(base_channels=16, channel_mults=[1, 2], num_res_blocks=1, image_size=8,
                           attention_resolutions=[4], head_dim=8, cond_dim=32, text_dim=32, groups=4)
    cfg.data.num_frames, cfg.data.num_image_frames, cfg.data.image_size = 4, 0, 8
    cfg.data.val_shards = "in-memory"
    cfg.run.out_dir, cfg.run.precision, cfg.run.steps = str(tmp_path / "run"), "fp32", 10
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def _parts(cfg):
    from model.unet import SpaceTimeUNet
    from trainer.strategies.base import build_strategy

    strategy = build_strategy(cfg, CPU)
    torch.manual_seed(0)
    strategy.setup(SpaceTimeUNet(cfg.model))
    return strategy, EMA(strategy.local_params(), 0.5), GaussianDiffusion.from_config(cfg.diffusion)


def _val_loader_factory(n_batches: int, served: list):
    def factory(data_cfg, rank, world_size, train, **_):
        assert data_cfg.shards == "in-memory" and not train and world_size == 1
        gen = torch.Generator().manual_seed(0)
        for _ in range(n_batches):
            served.append(1)
            yield {"video": torch.rand(2, 3, 4, 8, 8, generator=gen) * 2 - 1,
                   "text_emb": torch.randn(2, 3, 32, generator=gen), "text_mask": torch.ones(2, 3, dtype=torch.bool),
                   "num_video_frames": 4}

    return factory


def test_validation_is_the_same_every_time_reads_its_batches_once_and_keeps_the_rng(tmp_path, capsys):
    cfg = _cfg(tmp_path, val_every=5, val_batches=2)
    strategy, _, diffusion = _parts(cfg)
    served: list = []
    v = Validator(cfg, strategy, diffusion, Metrics(tmp_path, enabled=True), CPU.device,
                  loader_factory=_val_loader_factory(10, served))
    assert [s for s in range(11) if v.due(s)] == [0, 5, 10]
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    first = v.run(5)
    assert torch.equal(torch.rand(2), expected)  # the training RNG did not move
    assert v.run(10) == first and len(served) == 2  # fixed noise; run.val_batches read once
    bands = [first[k] for k in sorted(first) if k.startswith("val/loss_band/")]
    assert len(bands) == 8 and all(b > 0 for b in bands)
    by_band = [first[f"val/loss_band/{label}"] for label in band_labels(v.edges)]
    assert first["val/loss"] == pytest.approx(sum(w * b for w, b in zip(v.weights, by_band)))
    assert first["val/loss_band_mean"] == pytest.approx(sum(bands) / 8)
    assert strategy.model.training  # back in training mode
    assert "[val] step 5: loss" in capsys.readouterr().out


def test_validation_without_batches_says_so_and_returns_nothing(tmp_path, capsys):
    cfg = _cfg(tmp_path, val_every=1)
    strategy, _, diffusion = _parts(cfg)
    v = Validator(cfg, strategy, diffusion, Metrics(tmp_path, True), CPU.device,
                  loader_factory=_val_loader_factory(0, []))
    assert v.run(1) == {}
    assert "[val] no batches in in-memory; validation disabled" in capsys.readouterr().out
    cfg.data.val_shards = ""
    assert not v.due(1)


def test_training_samples_need_prompts_and_a_text_encoder(tmp_path):
    cfg = _cfg(tmp_path, sample_every=2, sample_prompts=["a red square"])
    strategy, ema, diffusion = _parts(cfg)
    samples = TrainingSamples(cfg, strategy, ema, diffusion, Metrics(tmp_path, True), CPU.device, rank=0)
    assert samples.due(4) and not samples.due(3)
    with pytest.raises(RuntimeError, match="run.sample_prompts needs a text encoder"):
        samples.run(4)
    cfg.run.sample_prompts = []
    assert not samples.due(4)


def _move_live_weights_away_from_the_ema(strategy, ema) -> None:
    """A fresh EMA is a copy of the weights: without this a check on the live weights would pass as one
    on the EMA (docs/trainer.md: "Samples and exports always use the EMA weights")."""
    with torch.no_grad():
        for p in strategy.local_params():
            p.add_(0.5)
    assert not any(torch.equal(p, e) for p, e in zip(strategy.local_params(), ema.shadow))


def _holds_the_ema(model, ema) -> bool:
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    return len(names) == len(ema.shadow) and all(torch.equal(params[n].detach(), e) for n, e in zip(names, ema.shadow))


def test_training_samples_write_a_video_per_prompt_from_the_ema_weights(tmp_path, tiny_bert_dir, capsys,
                                                                         monkeypatch):
    import trainer.generate

    cfg = _cfg(tmp_path, sample_every=2, sample_steps=2, sample_prompts=["a red square", "a blue circle"])
    strategy, ema, diffusion = _parts(cfg)
    _move_live_weights_away_from_the_ema(strategy, ema)
    sampled_with, generate = [], trainer.generate.generate
    monkeypatch.setattr(trainer.generate, "generate", lambda model, *a, **k: sampled_with.append(model) or
                        generate(model, *a, **k))
    samples = TrainingSamples(cfg, strategy, ema, diffusion, Metrics(tmp_path / "run", True), CPU.device, 0,
                              text_encoder=tiny_bert_dir)
    written = samples.run(2)
    assert len(sampled_with) == 1 and _holds_the_ema(sampled_with[0], ema)
    assert sorted(p.name for p in written) == ["0_a_red_square.gif", "0_a_red_square.mp4",
                                               "1_a_blue_circle.gif", "1_a_blue_circle.mp4"]
    assert all(p.parent.name == "step-000002" and p.stat().st_size > 0 for p in written)
    assert "[samples] step 2: 2 videos in" in capsys.readouterr().out


class StandInEvaluator:
    def __init__(self):
        self.models = []

    def run(self, model) -> EvalResult:
        self.models.append(model)
        return EvalResult(metrics={"colour_acc": 0.5, "direction_acc": 1.0, "shape_acc": 0.25,
                                   "colour_direction_acc": 0.5}, info={"seed": "0"}, lines=["[eval] a table row"])


def test_in_loop_evaluation_logs_the_evaluators_metrics_on_the_ema_weights(tmp_path, capsys):
    cfg = _cfg(tmp_path, eval_every=4)
    strategy, ema, _ = _parts(cfg)
    _move_live_weights_away_from_the_ema(strategy, ema)
    evaluator = StandInEvaluator()
    evaluation = InLoopEvaluation(cfg, strategy, ema, Metrics(tmp_path / "run", True), CPU.device, 0, evaluator)
    assert [s for s in range(1, 11) if evaluation.due(s)] == [4, 8]
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    assert evaluation.run(4) == {"eval/colour_acc": 0.5, "eval/direction_acc": 1.0, "eval/shape_acc": 0.25,
                                 "eval/colour_direction_acc": 0.5}
    assert _holds_the_ema(evaluator.models[0], ema)
    logged = json.loads((tmp_path / "run" / "eval_log.jsonl").read_text())
    assert logged == {"step": 4, "colour_acc": 0.5, "direction_acc": 1.0, "shape_acc": 0.25,
                      "colour_direction_acc": 0.5, "info": {"seed": "0"}}
    out = capsys.readouterr().out
    assert "[eval] a table row" in out and "[eval] step 4: colour 50%" in out


def test_an_evaluation_the_run_never_reaches_builds_no_evaluator(tmp_path):
    cfg = _cfg(tmp_path, eval_every=20)  # run.steps 10
    strategy, ema, _ = _parts(cfg)
    evaluation = InLoopEvaluation.for_run(cfg, strategy, ema, Metrics(tmp_path, True), CPU.device, 0)
    assert evaluation.evaluator is None and not evaluation.due(20)
    cfg.run.eval_every = 5  # reached, but the eval: section measures nothing: refused at start-up
    with pytest.raises(ValueError, match="eval: section measures nothing"):
        InLoopEvaluation.for_run(cfg, strategy, ema, Metrics(tmp_path, True), CPU.device, 0)
    # rank 1 takes part in the gather but never evaluates: no evaluator to check
    assert InLoopEvaluation.for_run(cfg, strategy, ema, Metrics(tmp_path, False), CPU.device, 1).evaluator is None


class Recorder:
    def __init__(self, name, every, log):
        self.name, self.every, self.log = name, every, log

    def due(self, step):
        return step % self.every == 0

    def run(self, step):
        self.log.append((self.name, step))


def test_periodic_checks_run_the_due_ones_in_order():
    log: list = []
    checks = PeriodicChecks(Recorder("val", 2, log), Recorder("samples", 3, log), Recorder("eval", 6, log),
                            extra=[Recorder("extra", 6, log)])
    for step in range(1, 7):
        checks.after_step(step)
    assert log == [("val", 2), ("samples", 3), ("val", 4), ("val", 6), ("samples", 6), ("eval", 6), ("extra", 6)]


def test_validation_calls_the_model_as_training_does_with_the_measured_motion(tmp_path):
    """With motion conditioning the model is called with the clip's measured motion (the training path,
    not the sampling path that predicts it) and its regression loss is logged as val/motion_loss."""
    from trainer.builder import model_conditioning

    cfg = _cfg(tmp_path, val_every=1, val_batches=1, caption_dropout=0.5)
    cfg.model.motion_conditioning = True
    strategy, _, diffusion = _parts(cfg)
    calls: list[dict] = []
    forward = strategy.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    strategy.forward = spy
    v = Validator(cfg, strategy, diffusion, Metrics(tmp_path, True), CPU.device,
                  loader_factory=_val_loader_factory(1, []), conditioning=model_conditioning(cfg, CPU.device, 0.0))
    result = v.run(1)
    assert calls and all(c["motion"].shape == (2, 4) and c["return_aux_losses"] for c in calls)
    assert all(c["text_mask"].all() for c in calls)  # no caption dropout in validation
    assert result["val/motion_loss"] > 0
