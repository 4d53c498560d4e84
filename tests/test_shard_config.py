"""Shard config: YAML + overrides, validation, and which settings the config hash covers."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from data_pipeline.config import ShardConfig, config_hash


def cfg(*overrides: str) -> ShardConfig:
    return load_config(ShardConfig, None, ["manifest=m.csv", *overrides]).validate()


def test_repo_configs_load_and_match_the_training_configs_they_feed():
    """The loader refuses shards whose geometry differs from the run's, so each pair must agree."""
    from trainer.config import TrainConfig

    for shard_name, train_name in (("demo", "demo"), ("webvid10m", "vdm_t2v_small_16x64"),
                                   ("webvid10m_9x128", "vdm_t2v_9x128")):
        c = load_config(ShardConfig, f"configs/shard/{shard_name}.yaml").validate()
        t = load_config(TrainConfig, f"configs/{train_name}.yaml")
        assert (c.clip.frames, c.clip.height, c.clip.width) == (t.data.num_frames,) + (t.data.image_size,) * 2, shard_name
    assert load_config(ShardConfig, "configs/shard/webvid10m_9x128.yaml").validate().clip.stride == 4


def test_hash_ignores_how_and_where_but_not_what():
    base = config_hash(cfg())
    for same in ("workers=8", "encoder.device=cuda", "encoder.batch_size=7", "fetch.retries=9", "decode_threads=4",
                 "slurm.nodes=3", "out_dir=/elsewhere", "max_failure_ratio=0.5", "encoder.threads=4"):
        assert config_hash(cfg(same)) == base, same
    for other in ("clip.frames=8", "clip.height=32", "clip.stride=2", "storage.format=npy", "storage.crf=30",
                  "encoder.name_or_path=minilm", "encoder.dtype=bf16", "samples_per_shard=10", "columns.key=id",
                  "clip.too_short=pad", "clip.clips_per_video=2"):
        assert config_hash(cfg(other)) != base, other
    # the h264 knobs do not matter for raw frames
    assert config_hash(cfg("storage.format=npy", "storage.crf=30")) == config_hash(cfg("storage.format=npy"))


def test_validation_errors_name_the_setting():
    with pytest.raises(ConfigError, match="manifest"):
        load_config(ShardConfig, None, []).validate()
    with pytest.raises(ConfigError, match="even"):
        cfg("clip.height=33")
    assert cfg("clip.height=33", "storage.format=npy").clip.height == 33
    with pytest.raises(ConfigError, match="stride"):
        cfg("clip.stride=0")
    with pytest.raises(ConfigError, match="fps"):
        cfg("clip.fps=null")
    c = cfg("clip.stride=3")
    assert c.clip.stride == 3 and c.clip.fps is None  # stride wins over the default fps
    with pytest.raises(ConfigError, match="too_short"):
        cfg("clip.too_short=maybe")
