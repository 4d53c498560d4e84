"""Motion beyond one translation, end to end on real files: shapes that grow, shrink and turn
(data_pipeline.synthetic.make_motion_kind_videos), read back by the pixel reader; their global motion
(pan, zoom, rotation) measured by data_pipeline.shard on the full decoded frame, stored in each
`{key}.json` and handed to the model by the loader; shards made before that still train (the motion
measured on the fly)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import REPO, subprocess_env, tiny_config

from data_pipeline.decode import decode_mp4
from data_pipeline.synthetic import (
    COLOURS,
    DIRECTIONS,
    MOTION_KINDS,
    SHAPES,
    TURNING_SHAPES,
    inside_start,
    make_motion_kind_videos,
    motion_caption,
    render_clip,
    render_transform_clip,
    transform_centre,
)
from data_pipeline.synthetic_reader import parse_motion_caption, read_motion_kind, score_motion_kinds

REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "growing": "shrinking",
            "shrinking": "growing", "turning clockwise": "turning counterclockwise",
            "turning counterclockwise": "turning clockwise"}


def _downscaled(clip: np.ndarray) -> np.ndarray:
    """2x2 area average, as the demo's 32 px videos become 16 px clips."""
    t, h, w, c = clip.shape
    return clip.reshape(t, h // 2, 2, w // 2, 2, c).astype(np.float32).mean(axis=(2, 4)).round().astype(np.uint8)


def test_reader_reads_every_rendered_motion_kind_and_its_reverse_in_time():
    rng = np.random.default_rng(0)
    clips, captions = [], []
    for colour in COLOURS:
        for kind in MOTION_KINDS:
            for shape in TURNING_SHAPES if kind.startswith("turning") else SHAPES:
                if kind in DIRECTIONS:
                    clip = render_clip(shape, colour, kind, 8, 32, 32, inside_start(rng, kind, 32, 32, 0.3, 1.5),
                                       travel=0.3)
                else:
                    clip = render_transform_clip(shape, colour, kind, 8, 32, 32, transform_centre(rng, 32, 32))
                clips.append(_downscaled(clip))
                captions.append(motion_caption(colour, shape, kind))
                assert read_motion_kind(clips[-1][::-1]) == REVERSED[kind], captions[-1]
    acc = score_motion_kinds(clips, captions)
    assert acc["motion"] == 1.0 and acc["colour_and_motion"] == 1.0, acc
    assert parse_motion_caption("A Red Square turning counterclockwise") == {
        "colour": "red", "shape": "square", "motion": "turning counterclockwise"}
    assert parse_motion_caption("a red square moving left")["motion"] == "left"
    assert parse_motion_caption("a red square dancing") is None


def test_reader_says_nothing_for_a_still_shape():
    clip = render_transform_clip("square", "red", "growing", 8, 16, 16, (8.0, 8.0))
    assert read_motion_kind(np.repeat(clip[:1], 8, axis=0)) is None


@pytest.fixture(scope="module")
def kind_shards(tiny_bert_dir, tmp_path_factory) -> Path:
    """40 videos of every motion kind (32 px h264) through the real sharder at the demo's geometry."""
    root = tmp_path_factory.mktemp("motion_kinds")
    manifest = make_motion_kind_videos(root / "videos", n=40, frames=8, size=32, seed=3, room=1.5)
    out = root / "shards"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", "configs/shard/demo.yaml",
                        "--manifest", manifest, "--out", str(out), "--encoder", tiny_bert_dir, "--workers", "1",
                        "--samples-per-shard", "10", "--no-progress", "--set", "clip.frames=8",
                        "--set", "clip.height=16", "--set", "clip.width=16"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def _samples(shards: Path) -> dict[str, dict[str, bytes]]:
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                members.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    return members


def test_sharded_clips_read_as_captioned_and_store_their_motion(kind_shards):
    """The reader on real h264 clips (>= 95%, the bar it is held to before scoring samples), and the
    stored motion on the full frame: the captioned component carries the sign, the others stay small."""
    samples = _samples(kind_shards)
    assert len(samples) == 40
    clips = [decode_mp4(s["mp4"], 8) for s in samples.values()]
    captions = [s["txt"].decode() for s in samples.values()]
    acc = score_motion_kinds(clips, captions)
    assert acc["motion"] >= 0.95 and acc["colour"] == 1.0, acc
    signed = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1), "growing": (2, 1),
              "shrinking": (2, -1), "turning clockwise": (3, 1), "turning counterclockwise": (3, -1)}
    kinds = set()
    for s, caption in zip(samples.values(), captions):
        motion = json.loads(s["json"])["global_motion"]
        kind = parse_motion_caption(caption)["motion"]
        kinds.add(kind)
        axis, sign = signed[kind]
        assert motion[axis] * sign > 0.2, (caption, motion)  # pan 0.3 of the frame, zoom 0.8, turn 1 rad
        assert all(abs(m) < 0.5 * abs(motion[axis]) for i, m in enumerate(motion) if i != axis), (caption, motion)
    assert kinds == set(MOTION_KINDS)


def _without_stored_motion(src: Path, dst: Path) -> Path:
    """A copy of the shards as data_pipeline.shard wrote them before it stored the motion."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_dir():
            continue
        if f.suffix != ".tar":
            (dst / f.name).write_bytes(f.read_bytes())
            continue
        with tarfile.open(f) as tin, tarfile.open(dst / f.name, "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    del meta["global_motion"]
                    data = json.dumps(meta).encode()
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
    return dst


def test_loader_hands_the_stored_motion_and_old_shards_still_train(kind_shards, tmp_path, caplog):
    from common.config import load_config
    from data_pipeline.loader import build_loader
    from trainer.config import TrainConfig
    from trainer.distributed import DistEnv
    from trainer.loop import Trainer

    stored = {k: json.loads(s["json"])["global_motion"] for k, s in _samples(kind_shards).items()}
    cfg = load_config(TrainConfig, tiny_config(tmp_path / "c.yaml", str(kind_shards), tmp_path / "run",
                                               data={"num_frames": 8, "image_size": 16, "batch_size": 4},
                                               model={"image_size": 16, "motion_conditioning": True}))
    batch = next(iter(build_loader(cfg.data, train=True)))
    want = torch.tensor([stored[k] for k in batch["keys"]])
    torch.testing.assert_close(batch["global_motion"], want)

    old = _without_stored_motion(kind_shards, tmp_path / "old_shards")
    old_batch = next(iter(build_loader(cfg.data, shards=str(old), train=True)))
    assert torch.isnan(old_batch["global_motion"]).all()
    cfg.data.shards, cfg.run.steps, cfg.run.ckpt_every = str(old), 2, 0
    import model.conditioning

    model.conditioning._warned_on_the_fly = False
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    assert "measuring it on the fly" in caplog.text
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(rec["motion_loss"]) for rec in log)


class _KindOracle(torch.nn.Module):
    """A v-prediction denoiser whose samples are the rendered clip of each prompt's kind (or, with
    `reverse`, that clip played backwards: every kind read as its reverse)."""

    def __init__(self, prompts: list[str], reverse: bool = False):
        from data_pipeline.synthetic import render_transform_clip

        super().__init__()
        clips = []
        for p in prompts:
            t = parse_motion_caption(p)
            kind = t["motion"]
            if kind in DIRECTIONS:
                clip = render_clip(t["shape"], t["colour"], kind, 8, 32, 32, inside_start(
                    np.random.default_rng(0), kind, 32, 32, 0.3), travel=0.3)
            else:
                clip = render_transform_clip(t["shape"], t["colour"], kind, 8, 32, 32, (16.0, 16.0))
            clip = _downscaled(clip)
            clips.append(torch.from_numpy(clip[::-1].copy() if reverse else clip))
        self.register_buffer("clips", torch.stack(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)

    def forward(self, z, logsnr, text_emb=None, text_mask=None, num_video_frames=None):
        from model.diffusion import alpha_sigma, broadcast_to

        x = self.clips[text_emb[:, 0, 0].long()][:, :, : z.shape[2]]
        alpha, sigma = (broadcast_to(c.to(z.dtype), z) for c in alpha_sigma(logsnr))
        return alpha * (z - alpha * x) / sigma - sigma * x


@pytest.mark.parametrize("reverse", [False, True])
def test_evaluate_motion_kinds_scores_an_oracle_right_and_its_reversal_wrong(reverse):
    from test_synthetic_eval import _PromptEncoder

    from model.config import SamplingConfig
    from model.diffusion import GaussianDiffusion
    from trainer.synthetic_eval import evaluate_motion_kinds, motion_kind_grid

    prompts = motion_kind_grid(1)
    assert len(prompts) == 32 and {parse_motion_caption(p)["motion"] for p in prompts} == set(MOTION_KINDS)
    metrics, table = evaluate_motion_kinds(_KindOracle(prompts, reverse), GaussianDiffusion(prediction="v"),
                                           _PromptEncoder(prompts), frames=8, size=16, seeds=1,
                                           sampling=SamplingConfig(steps=8, guidance_weight=0.0), batch=11)
    assert metrics["colour"] == 1.0
    assert metrics["motion"] == (0.0 if reverse else 1.0), table
    assert "turning clockwise" in table
