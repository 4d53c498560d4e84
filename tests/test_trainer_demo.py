"""`make demo` end to end at a tiny size: synthetic videos → MiniLM shards → training → export → sample,
and a rerun reuses the shards and resumes instead of starting over."""

from __future__ import annotations

import subprocess

import process_group
from trainer_helpers import PY, REPO, subprocess_env


def _demo(out, *extra: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "trainer.demo", "--out", str(out), "--videos", "8", "--steps", "4",
           "--set", "data.batch_size=2", "--set", "run.log_every=1", "--set", "run.ckpt_every=2",
           "--set", "run.val_every=4", "--set", "run.val_batches=1", "--set", "run.sample_every=4",
           "--set", "run.sample_steps=2", "--set", "data.num_workers=0", "--eval-seeds", "1", *extra]
    return process_group.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_demo_runs_end_to_end_and_is_idempotent(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"tensorboard --logdir {out / 'run' / 'tb'}" in r.stdout
    assert "training loss (smoothed): first" in r.stdout
    # the accuracy table of every colour x direction prompt, and its summary line
    assert "colour \\ direction" in r.stdout and "colour and direction right in" in r.stdout
    assert (out / "eval.json").is_file()
    assert (out / "shards" / "index.json").is_file() and (out / "val_shards" / "index.json").is_file()
    assert len(list((out / "run" / "samples" / "step-000004").glob("*.mp4"))) == 2
    assert (out / "model.safetensors").is_file() and (out / "cli_sample.gif").is_file()
    assert list((out / "run" / "tb").glob("events.out.tfevents.*"))
    # conditional generation from the held-out clips: three scored tasks and their picture
    assert "conditional generation from held-out clips" in r.stdout
    for title, baseline in (("prediction", "repeat last frame"), ("interpolation", "linear blend"),
                            ("super-resolution", "bicubic")):
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"[demo]   {title} ("))
        assert "8 clips" in line and f"({baseline})" in line, line
    assert "keeps the observed direction in" in r.stdout
    assert (out / "conditional.png").is_file() and len(list((out / "conditional").glob("*.npy"))) == 9

    r = _demo(out, "--steps", "5")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("reusing shards") == 2
    assert "[resume]" in r.stdout and "at step 4" in r.stdout
