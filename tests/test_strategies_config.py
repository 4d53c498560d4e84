"""DeepSpeed config building (no processes): JSON under our settings, ignored keys, clear errors;
FSDP unit selection."""

from __future__ import annotations

import json
import logging

import pytest
from torch import nn

from trainer.config import TrainConfig
from trainer.strategies.deepspeed import build_ds_config, deep_merge
from trainer.strategies.fsdp import shard_units


def _cfg(**parallel) -> TrainConfig:
    cfg = TrainConfig()
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_json_is_merged_under_our_settings(tmp_path, caplog):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 123},
        "fp16": {"initial_scale_power": 12}, "train_batch_size": 999, "scheduler": {"type": "WarmupLR"},
        "optimizer": {"type": "AdamW", "params": {"lr": 5.0, "torch_adam": False}},
    }))
    cfg = _cfg(deepspeed_config=str(path), zero_stage=2)
    cfg.run.precision = "fp16"
    cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.lr, cfg.optim.grad_clip = 3, 4, 1e-4, 0.5
    with caplog.at_level(logging.WARNING):
        ds = build_ds_config(cfg, world_size=2, on_cpu=True)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 123}
    assert ds["fp16"] == {"initial_scale_power": 12, "enabled": True} and ds["bf16"]["enabled"] is False
    assert ds["train_batch_size"] == 3 * 4 * 2 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert "scheduler" not in ds
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True  # forced on CPU: no C++ build
    assert "stage 3" in caplog.text and "'scheduler' is ignored" in caplog.text
    # off CPU the JSON may choose DeepSpeed's fused Adam
    assert build_ds_config(cfg, world_size=2, on_cpu=False)["optimizer"]["params"]["torch_adam"] is False


def test_offload_and_bf16_overflow_check():
    cfg = _cfg(zero_stage=3, offload_optimizer=True)
    cfg.run.precision = "bf16"
    ds = build_ds_config(cfg, world_size=1, on_cpu=True)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
    ('{"optimizer": {"type": "Lamb"}}', "not supported"),
])
def test_bad_json_is_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        build_ds_config(_cfg(deepspeed_config=str(path)), world_size=1, on_cpu=True)
    assert "bad.json" in str(info.value) or "Lamb" in str(info.value)


def test_bad_stage():
    with pytest.raises(ValueError, match="zero_stage"):
        build_ds_config(_cfg(zero_stage=4), world_size=1, on_cpu=True)


def test_shipped_configs_parse():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/deepspeed/*.json")):
        stage = int(path.stem[-1])
        ds = build_ds_config(_cfg(deepspeed_config=str(path), zero_stage=stage), world_size=2, on_cpu=True)
        assert ds["zero_optimization"]["stage"] == stage


def test_deep_merge_recurses_and_copies():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = deep_merge(base, {"a": {"b": 5}, "e": 6})
    assert out == {"a": {"b": 5, "c": 2}, "d": 3, "e": 6} and base["a"]["b"] == 1


def test_shard_units_prefers_model_blocks_then_modulelists_innermost_first():
    from model.config import UNetConfig
    from model.unet import SpaceTimeUNet

    unet = SpaceTimeUNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, image_size=8,
                                    attention_resolutions=(4,), head_dim=8, cond_dim=16, text_dim=16, groups=4))
    assert shard_units(unet) and {id(m) for m in shard_units(unet)} == {id(m) for m in unet.blocks()}
    inner = nn.ModuleList([nn.Linear(2, 2)])
    outer = nn.Sequential(nn.ModuleList([nn.Sequential(inner)]), nn.ModuleList([nn.ReLU()]))
    units = shard_units(outer)
    assert units[0] is inner[0] and len(units) == 2  # parameter-free ReLU is not a unit


def test_deepspeed_bf16_casts_activations_but_keeps_logsnr_fp32():
    """bf16 cannot tell λ = 1.5 from 1.504 (spacing 0.0078); the model must still see the difference."""
    import torch

    from model.config import UNetConfig
    from model.unet import SpaceTimeUNet
    from trainer.strategies.deepspeed import DeepSpeedStrategy

    torch.manual_seed(0)
    unet = SpaceTimeUNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, image_size=8,
                                    attention_resolutions=(4,), head_dim=8, cond_dim=16, text_dim=16, groups=4))
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)  # the zero-initialised output conv would hide any difference
    unet = unet.to(torch.bfloat16)
    strategy = object.__new__(DeepSpeedStrategy)  # only the input casting, no engine
    strategy.dtype = torch.bfloat16
    z = torch.randn(1, 3, 2, 8, 8)
    outs = []
    for lam in (1.5, 1.504):
        args = strategy._cast((z, torch.tensor([lam])))
        assert args[0].dtype == torch.bfloat16 and args[1].dtype == torch.float32
        with torch.no_grad():
            outs.append(unet(*args))
    assert outs[0].dtype == torch.bfloat16 and not torch.equal(outs[0], outs[1])
