"""The typed config loader: every CLI depends on it to reject typos before a long run starts."""

from pathlib import Path

import pytest

from common.config import ConfigError, load_config, to_dict
from trainer.config import TrainConfig

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.data.num_frames > 0 and cfg.model.image_size == cfg.data.image_size


def test_paper_numbers_in_small_config():
    cfg = load_config(TrainConfig, "configs/vdm_t2v_small_16x64.yaml")
    assert cfg.model.base_channels == 128 and cfg.model.channel_mults == (1, 2, 4, 8)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.diffusion.prediction == "eps"
    assert cfg.sampling.steps == 256 and cfg.sampling.gamma == pytest.approx(0.3)


def test_overrides_are_typed():
    cfg = load_config(TrainConfig, "configs/demo.yaml",
                      ["optim.lr=0.5", "model.channel_mults=[1,2,4]", "run.sample_prompts=[a, b]",
                       "model.cross_attention=false", "run.steps=7", "parallel.strategy=ddp"])
    assert cfg.optim.lr == 0.5 and cfg.model.channel_mults == (1, 2, 4)
    assert cfg.run.sample_prompts == ["a", "b"] and cfg.model.cross_attention is False
    assert cfg.run.steps == 7 and isinstance(cfg.run.steps, int) and cfg.parallel.strategy == "ddp"


def test_unknown_override_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, "configs/demo.yaml", ["optim.learning_rate=1"])
    assert "optim.learning_rate" in str(e.value) and "lr" in str(e.value) and "warmup_steps" in str(e.value)


def test_unknown_yaml_key_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  base_channel: 3\n")
    with pytest.raises(ConfigError, match=r"model\.base_channel.*valid keys.*base_channels"):
        load_config(TrainConfig, bad)
    bad.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match=r"modle.*valid keys.*model"):
        load_config(TrainConfig, bad)


@pytest.mark.parametrize("override,fragment", [
    ("run.steps=many", "run.steps: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("parallel.strategy=horovod", "parallel.strategy: 'horovod' is not one of"),
    ("model.cross_attention=maybe", "model.cross_attention: expected true/false"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 items"),
])
def test_wrong_value_type_names_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, "configs/demo.yaml", [override])
    assert fragment in str(e.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(TrainConfig, None, ["run.steps"])


def test_round_trip_through_dict():
    cfg = load_config(TrainConfig, "configs/vdm_t2v_9x128.yaml")
    from common.config import from_dict

    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_an_empty_override_sets_a_string_to_empty():
    from common.config import load_config
    from trainer.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["run.init_from=x.safetensors"])
    assert cfg.run.init_from == "x.safetensors"
    assert load_config(TrainConfig, None, ["run.init_from="]).run.init_from == ""


# sampling.guide_weight was renamed sampling.reconstruction_weight (it read like guidance_weight, the
# classifier-free weight): the old key still works, with a warning that names both
def test_old_guide_weight_key_in_yaml_is_read_and_warns(tmp_path):
    from common.config import RenamedWarning

    p = tmp_path / "c.yaml"
    p.write_text("sampling:\n  guide_weight: 6.5\n")
    with pytest.warns(RenamedWarning, match=r"sampling\.guide_weight.*sampling\.reconstruction_weight"):
        cfg = load_config(TrainConfig, p)
    assert cfg.sampling.reconstruction_weight == 6.5
    assert "guide_weight" not in to_dict(cfg)["sampling"]  # saved configs carry the new name


def test_old_guide_weight_override_is_read_and_warns(tmp_path):
    from common.config import RenamedWarning

    with pytest.warns(RenamedWarning, match=r"sampling\.guide_weight.*sampling\.reconstruction_weight"):
        cfg = load_config(TrainConfig, None, ["sampling.guide_weight=2"])
    assert cfg.sampling.reconstruction_weight == 2.0
    # a new-name override wins over the file's old key; both names in one mapping is an error
    p = tmp_path / "c.yaml"
    p.write_text("sampling:\n  guide_weight: 6.5\n")
    assert load_config(TrainConfig, p, ["sampling.reconstruction_weight=3"]).sampling.reconstruction_weight == 3.0
    p.write_text("sampling:\n  guide_weight: 6.5\n  reconstruction_weight: 3\n")
    with pytest.raises(ConfigError, match="both set"):
        load_config(TrainConfig, p)


def test_new_reconstruction_weight_key_does_not_warn(recwarn):
    assert load_config(TrainConfig, None, ["sampling.reconstruction_weight=5"]).sampling.reconstruction_weight == 5
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
