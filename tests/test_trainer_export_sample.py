"""trainer.export round-trips the EMA weights; trainer.sample writes decodable videos of the requested
length (plain and extended with reconstruction guidance)."""

from __future__ import annotations

import json
import subprocess

import av
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_helpers import PY, REPO, run_train, subprocess_env, tiny_config

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
    return subprocess.run([PY, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)


def test_export_roundtrips_ema_and_config(trained_run, tmp_path):
    out, bert = trained_run
    target = tmp_path / "model.safetensors"
    r = _cli("-m", "trainer.export", "--checkpoint", str(out), "--out", str(target))
    assert r.returncode == 0, r.stderr
    tensors = load_file(str(target))
    ckpt = find_latest(out)
    ema = torch.load(ckpt / "ema-rank0.pt", weights_only=True)
    from model.unet import SpaceTimeUNet
    from trainer.config import TrainConfig, from_dict

    with safe_open(str(target), framework="pt") as f:
        meta = f.metadata()
    cfg = from_dict(TrainConfig, json.loads(meta["config"]))
    assert meta["step"] == "2" and meta["text_encoder"] == bert
    model = SpaceTimeUNet(cfg.model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(ema) and set(names) <= set(tensors)
    for name, value in zip(names, ema):
        assert torch.equal(tensors[name], value), name
    live = torch.load(ckpt / "model.pt", weights_only=True)
    assert any(not torch.equal(live[n], tensors[n]) for n in names)  # EMA, not the live weights
    model.load_state_dict(tensors)  # complete state dict


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
