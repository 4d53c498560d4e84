"""One source of every default: the config dataclasses (model/config.py) hold what a user configures;
library functions take a config or explicit values and define no default of their own, except the
exact sampler's clip_x=False and GaussianDiffusion's prediction="v" (both documented)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from model import guidance, sampling
from model.config import DiffusionConfig, SamplingConfig
from model.diffusion import GaussianDiffusion, cosine_logsnr
from trainer import generate as generate_mod
from trainer.sample import parse_args, sampling_from_args


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_sample_takes_its_defaults_from_sampling_config_but_stays_unclipped():
    d, cfg = _defaults(sampling.sample), SamplingConfig()
    for name in ("steps", "sampler", "gamma", "langevin_delta", "guidance_weight"):
        assert d[name] == getattr(cfg, name), name
    assert d["clip_x"] is False and cfg.clip_x is True  # the exact sampler; clipping is the callers' policy
    assert _defaults(sampling.extend)["reconstruction_weight"] == cfg.reconstruction_weight
    assert _defaults(guidance.frame_guide)["weight"] == cfg.reconstruction_weight


def test_gaussian_diffusion_defaults_are_the_config_s_and_prediction_has_none():
    d, cfg = _defaults(GaussianDiffusion.__init__), DiffusionConfig()
    for name in ("logsnr_min", "logsnr_max", "loss_weighting", "logsnr_shift"):
        assert d[name] == getattr(cfg, name), name
    assert "prediction" not in d  # required: a bare construction must not misread an eps checkpoint as v
    assert GaussianDiffusion.from_config(cfg).prediction == cfg.prediction == "eps"  # a config always wins
    c = _defaults(cosine_logsnr)
    assert (c["logsnr_min"], c["logsnr_max"], c["shift"]) == (cfg.logsnr_min, cfg.logsnr_max, cfg.logsnr_shift)


def _captured_generate(monkeypatch, **kwargs) -> dict:
    seen = {}

    def fake(denoiser, diffusion, shape, **kw):
        seen.update(kw)
        return torch.zeros(shape)

    def fake_extend(denoiser, diffusion, shape, total, **kw):
        seen.update(kw)
        return torch.zeros(shape[:2] + (total,) + shape[3:])

    monkeypatch.setattr(generate_mod, "sample", fake)
    monkeypatch.setattr(generate_mod, "extend", fake_extend)
    net = torch.nn.Identity()
    generate_mod.generate(net, GaussianDiffusion("v"), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool),
                          frames=2, height=4, width=4, **kwargs)
    return seen


def test_generate_defines_no_default_of_its_own(monkeypatch):
    assert all(v is None for k, v in _defaults(generate_mod.generate).items()
               if k in {f.name for f in dataclasses.fields(SamplingConfig)})
    seen = _captured_generate(monkeypatch)
    assert {k: seen[k] for k in SamplingConfig().sample_kwargs()} == SamplingConfig().sample_kwargs()
    assert seen["clip_x"] is True  # the config's policy applies to videos for people to watch
    sc = SamplingConfig(sampler="ddim", steps=7, gamma=0.5, guidance_weight=2.0, clip_x=False, reconstruction_weight=3.0)
    seen = _captured_generate(monkeypatch, sampling=sc, steps=5, extend_to=4)
    assert seen["steps"] == 5 and seen["sampler"] == "ddim" and seen["clip_x"] is False
    assert seen["reconstruction_weight"] == 3.0 and seen["guidance_weight"] == 2.0


def test_sample_cli_fills_unset_flags_from_the_checkpoint_config():
    sc = SamplingConfig(sampler="pc", steps=100, gamma=0.1, guidance_weight=2.0, reconstruction_weight=6.0)
    base = ["--checkpoint", "x", "--prompt", "p", "--out", "o.mp4"]
    assert sampling_from_args(sc, parse_args(base)) == sc
    got = sampling_from_args(sc, parse_args(base + ["--steps", "8", "--reconstruction-weight", "2", "--gamma", "0"]))
    assert (got.steps, got.reconstruction_weight, got.gamma, got.sampler) == (8, 2.0, 0.0, "pc")


def test_old_guide_weight_names_still_work_and_warn():
    from common.config import RenamedWarning

    base = ["--checkpoint", "x", "--prompt", "p", "--out", "o.mp4"]
    with pytest.warns(RenamedWarning, match="--guide-weight.*--reconstruction-weight"):
        a = parse_args(base + ["--guide-weight", "2.5"])
    assert sampling_from_args(SamplingConfig(), a).reconstruction_weight == 2.5
    with pytest.raises(SystemExit), pytest.warns(RenamedWarning):
        parse_args(base + ["--guide-weight", "2.5", "--reconstruction-weight", "3"])

    seen = []
    den = lambda z, lam: torch.zeros_like(z)  # noqa: E731
    real = guidance.frame_guide
    try:
        sampling.frame_guide = lambda ctx, t, kind, w: seen.append(w) or real(ctx, t, kind, w)
        with pytest.warns(RenamedWarning, match=r"extend\(guide_weight=\).*extend\(reconstruction_weight=\)"):
            sampling.extend(den, GaussianDiffusion("eps"), (1, 1, 4, 1, 1), 6, steps=1, guide_weight=1.5)
    finally:
        sampling.frame_guide = real
    assert seen == [1.5]


def test_shared_constants_have_one_home():
    """The precision map, the requeue exit code and the seed salts are defined once and imported."""
    from common import exit_codes
    from data_pipeline import loader, plan
    from model import precision, text_encoder
    from slurm import launch
    from trainer import builder, evaluate, loop, seeding, validation
    from trainer.strategies import base

    assert base.autocast_dtype is precision.autocast_dtype
    assert precision.autocast_dtype("fp32") is None and precision.autocast_dtype("bf16") == torch.bfloat16
    assert text_encoder.PRECISION_DTYPES is precision.PRECISION_DTYPES
    with pytest.raises(ValueError, match="fp8"):
        precision.precision_dtype("fp8")
    assert launch.EXIT_REQUEUE is loop.EXIT_REQUEUE is exit_codes.EXIT_REQUEUE == 75
    train_sh = (Path(__file__).resolve().parents[1] / "slurm" / "train.sh").read_text()
    assert f"EXIT_REQUEUE={exit_codes.EXIT_REQUEUE} " in train_sh and "124" not in train_sh
    assert builder.loader_factory_or_default is evaluate.loader_factory_or_default
    assert validation.loader_factory_or_default is evaluate.loader_factory_or_default
    assert evaluate.loader_factory_or_default(None) is loader.build_loader
    # the salts' values fix the data order and seeds of existing runs: renaming must not change them
    salts = (plan.SALT_SHARD_ORDER, plan.SALT_STREAM_ORDER, plan.SALT_TRAIN_IMAGE_FRAMES, plan.SALT_VAL_IMAGE_FRAMES,
             seeding.RANK_SEED_STRIDE, validation.SALT_VAL_NOISE, evaluate.FVD_BATCH_SEED_STRIDE)
    assert salts == (0x5A4D, 0xB0F, 0x1A6E, 0x7A1, 1_000_003, 4242, 7919)


def test_caption_and_output_defaults_have_one_home():
    """The encoder name and caption length the sharder, the loader and TextEncoder fall back on come
    from common.captions; prompt encoding takes the run's data.max_text_len; written samples share one
    frame rate; loss bands take the run's log-SNR range."""
    from common import captions
    from data_pipeline.config import EncoderConfig
    from data_pipeline.loader_config import DataConfig
    from model.text_encoder import TextEncoder
    from trainer import metrics, video_io

    enc = EncoderConfig()
    assert (enc.name_or_path, enc.max_length) == (captions.PRODUCTION_ENCODER, captions.MAX_CAPTION_TOKENS)
    assert DataConfig().max_text_len == captions.MAX_CAPTION_TOKENS
    assert _defaults(TextEncoder.__init__)["name_or_path"] == captions.PRODUCTION_ENCODER
    assert _defaults(TextEncoder.__init__)["max_length"] == captions.MAX_CAPTION_TOKENS
    assert "max_length" not in _defaults(generate_mod.load_text_encoder)
    assert {_defaults(f)["fps"] for f in (video_io.write_mp4, video_io.write_gif, video_io.gif_bytes,
                                          video_io.video_summary)} == {video_io.OUTPUT_FPS}
    assert parse_args(["--checkpoint", "c", "--prompt", "p", "--out", "o.mp4"]).fps is None  # -> OUTPUT_FPS
    assert _defaults(metrics.band_edges).keys() == {"width"}


def test_sampler_names_are_listed_once(capsys):
    """The config's Literal, the library's check and the CLI's --sampler choices read one list."""
    import typing

    from model import config, sampling
    from trainer import sample

    assert sampling.SAMPLERS is config.SAMPLERS == ("ancestral", "ddim", "pc")
    assert typing.get_args(typing.get_type_hints(config.SamplingConfig)["sampler"]) == config.SAMPLERS
    with pytest.raises(SystemExit):
        sample.parse_args(["--checkpoint", "c", "--prompt", "p", "--out", "o.mp4", "--sampler", "euler"])
    error = capsys.readouterr().err
    assert "invalid choice: 'euler'" in error and all(f"'{name}'" in error for name in config.SAMPLERS)
