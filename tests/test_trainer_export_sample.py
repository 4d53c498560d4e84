"""trainer.export round-trips the EMA weights; trainer.sample writes decodable videos of the requested
length (plain and extended with reconstruction guidance)."""

from __future__ import annotations

import json
import subprocess

import av
import process_group
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_helpers import PY, REPO, run_train, saved_tensors, subprocess_env, tiny_config

from trainer.checkpoint import find_latest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, trainer_shards):
    shards, bert = trainer_shards
    root = tmp_path_factory.mktemp("export_run")
    out = root / "run"
    r = run_train(tiny_config(root / "c.yaml", shards, out, run={"steps": 2, "ckpt_every": 2}))
    assert r.returncode == 0, r.stdout + r.stderr
    return out, bert


def _cli(*args: str) -> subprocess.CompletedProcess:
    return process_group.run([PY, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)


def test_export_roundtrips_ema_and_config(trained_run, tmp_path):
    out, bert = trained_run
    target = tmp_path / "model.safetensors"
    r = _cli("-m", "trainer.export", "--checkpoint", str(out), "--out", str(target))
    assert r.returncode == 0, r.stderr
    tensors = load_file(str(target))
    ckpt = find_latest(out)
    ema = saved_tensors(ckpt, "ema")
    from common.config import from_dict
    from model.unet import SpaceTimeUNet
    from trainer.config import TrainConfig

    with safe_open(str(target), framework="pt") as f:
        meta = f.metadata()
    cfg = from_dict(TrainConfig, json.loads(meta["config"]))
    assert meta["step"] == "2" and meta["text_encoder"] == bert
    model = SpaceTimeUNet(cfg.model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(ema) and set(names) <= set(tensors)
    for name in names:
        assert torch.equal(tensors[name], ema[name]), name
    live = saved_tensors(ckpt, "model")
    assert any(not torch.equal(live[n], tensors[n]) for n in names)  # EMA, not the live weights
    model.load_state_dict(tensors)  # complete state dict


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    target = tmp_path_factory.mktemp("exported") / "model.safetensors"
    r = _cli("-m", "trainer.export", "--checkpoint", str(trained_run[0]), "--out", str(target))
    assert r.returncode == 0, r.stderr
    return target


def test_init_from_starts_a_new_run_on_another_world_size_from_the_exported_weights(trained_run, exported,
                                                                                   tmp_path):
    """A single-process run's export warm-starts a 2-process DDP run (a sharded checkpoint could not be
    resumed that way). With lr=0 the first step leaves the weights as loaded, so the new checkpoint's
    model and EMA must equal the export; a rerun then resumes from its own checkpoint, not the export."""
    import yaml

    from common.config import from_dict
    from trainer.config import TrainConfig

    src = from_dict(TrainConfig, yaml.safe_load((trained_run[0] / "config.yaml").read_text()))
    out = tmp_path / "warm"
    cfg = tiny_config(tmp_path / "c.yaml", src.data.shards, out, run={"steps": 1, "ckpt_every": 1},
                      parallel={"strategy": "ddp", "backend": "gloo"}, optim={"lr": 0.0, "warmup_steps": 0})
    r = run_train(cfg, f"run.init_from={exported}", nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[init] model and EMA weights from {exported} (step 2 of its run)" in r.stdout
    tensors = load_file(str(exported))
    ckpt = find_latest(out)
    live = saved_tensors(ckpt, "model")
    assert set(live) == set(tensors) and all(torch.equal(live[k], tensors[k]) for k in tensors)
    from model.unet import SpaceTimeUNet

    names = [n for n, p in SpaceTimeUNet(src.model).named_parameters() if p.requires_grad]
    ema = saved_tensors(ckpt, "ema")
    assert sorted(ema) == sorted(names)
    assert all(torch.allclose(ema[n], tensors[n], rtol=1e-6, atol=1e-7) for n in names)
    r = run_train(cfg, f"run.init_from={exported}", "run.steps=2", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[init]" not in r.stdout and "[resume]" in r.stdout and "at step 1" in r.stdout


def test_init_from_a_different_model_names_what_differs(exported):
    from common.config import from_dict
    from model.unet import SpaceTimeUNet
    from trainer.config import TrainConfig
    from trainer.export import load_initial_weights

    with safe_open(str(exported), framework="pt") as f:
        cfg = from_dict(TrainConfig, json.loads(f.metadata()["config"])).model
    wider = type(cfg)(**{**cfg.__dict__, "base_channels": cfg.base_channels * 2})
    with pytest.raises(ValueError, match=r"run.init_from=.*do not fit.*base_channels: 16 there, 32 here"):
        load_initial_weights(SpaceTimeUNet(wider), exported, wider)


def _frames(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_sample_cli_writes_mp4_and_gif_of_requested_length(trained_run, tmp_path):
    out, _ = trained_run
    target = tmp_path / "m.safetensors"
    assert _cli("-m", "trainer.export", "--checkpoint", str(out), "--out", str(target)).returncode == 0
    video = tmp_path / "x.mp4"
    r = _cli("-m", "trainer.sample", "--checkpoint", str(target), "--prompt", "a red square moving right",
             "--out", str(video), "--steps", "2", "--frames", "4", "--extend-to", "6", "--guidance-weight", "2")
    assert r.returncode == 0, r.stderr
    assert _frames(video) == 6
    with Image.open(video.with_suffix(".gif")) as gif:
        assert gif.n_frames == 6


def test_sample_cli_from_checkpoint_dir_two_prompts(trained_run, tmp_path):
    out, _ = trained_run
    video = tmp_path / "y.mp4"
    r = _cli("-m", "trainer.sample", "--checkpoint", str(find_latest(out)), "--prompt", "a red square",
             "--prompt", "a blue circle", "--out", str(video), "--steps", "2", "--sampler", "ddim")
    assert r.returncode == 0, r.stderr
    assert _frames(tmp_path / "y_0.mp4") == 4 and _frames(tmp_path / "y_1.mp4") == 4


def test_sample_cli_names_a_missing_checkpoint(tmp_path):
    r = _cli("-m", "trainer.sample", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x", "--out",
             str(tmp_path / "z.mp4"))
    assert r.returncode == 1 and "no complete checkpoint" in r.stderr


def test_init_from_a_missing_file_names_the_setting(tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", str(tmp_path / "no-shards"), tmp_path / "run")
    r = run_train(cfg, f"run.init_from={tmp_path / 'gone.safetensors'}")
    assert r.returncode == 1 and f"run.init_from={tmp_path / 'gone.safetensors'}: No such file" in r.stderr, r.stderr


def _stream(path) -> tuple[int, int, int, float]:
    """(frames, width, height, frame rate) of an mp4."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sum(1 for _ in c.decode(video=0)), s.width, s.height, float(s.average_rate)


def test_sample_cli_completes_a_real_video_for_each_task(exported, tmp_path):
    """--condition: a real mp4 from the project's writer; prediction (no prompt) extended past the
    window, interpolation at 3x the frame rate, upsampling 4x4 -> the model's 8x8 (with a prompt)."""
    from data_pipeline.synthetic import render_clip
    from trainer.video_io import write_mp4

    clip = write_mp4(tmp_path / "in.mp4", render_clip("circle", "blue", "down", 10, 16, 16, start=(4.0, 8.0),
                                                      travel=0.4, wrap=False), fps=8)
    common = ["-m", "trainer.sample", "--checkpoint", str(exported), "--condition", str(clip), "--steps", "2"]
    runs = {"predict": ["--observed-frames", "2", "--extend-to", "6"],
            "interpolate": ["--factor", "3", "--condition-frames", "3"],
            "upsample": ["--factor", "2", "--condition-frames", "5", "--prompt", "a blue circle moving down"]}
    for task, args in runs.items():
        r = _cli(*common, "--task", task, "--out", str(tmp_path / f"{task}.mp4"), *args)
        assert r.returncode == 0, r.stdout + r.stderr
    assert _stream(tmp_path / "predict.mp4") == (6, 8, 8, 8.0)
    assert _stream(tmp_path / "interpolate.mp4") == (7, 8, 8, 24.0)
    assert _stream(tmp_path / "upsample.mp4") == (5, 8, 8, 8.0)
    assert (tmp_path / "upsample.gif").is_file()
    r = _cli("-m", "trainer.sample", "--checkpoint", str(exported), "--condition", str(clip), "--out",
             str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "--condition and --task go together" in r.stderr
    r = _cli(*common, "--task", "predict", "--observed-frames", "4", "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 1 and "0 < k < window" in r.stderr
