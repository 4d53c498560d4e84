"""`python -m trainer.evaluate` and in-loop evaluation (run.eval_every): real tiny training runs, real
shards, a scripted stand-in for the I3D detector, TensorBoard events read back."""

from __future__ import annotations

import json
import subprocess

import process_group
import pytest
from trainer_helpers import PY, REPO, run_train, subprocess_env, tiny_config


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return process_group.run([PY, "-m", "trainer.evaluate", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, trainer_shards, standin_i3d_file):
    """A tiny run that evaluates both metrics and super-resolution of 2 held-out clips at steps 2 and 4 (FVD
    and held-out clips from its own shards)."""
    shards, _ = trainer_shards
    root = tmp_path_factory.mktemp("eval_run")
    out = root / "run"
    cfg = tiny_config(root / "c.yaml", shards, out, data={"val_shards": shards},
                      run={"steps": 4, "eval_every": 2},
                      eval={"synthetic": True, "seeds": 1, "steps": 2, "fvd_detector": str(standin_i3d_file),
                            "fvd_clips": 6, "batch_size": 8, "tasks": ["upsample"], "task_clips": 2})
    r = run_train(cfg, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_training_logs_eval_metrics_to_tensorboard_the_log_and_eval_log(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, stdout = evaluated_run
    assert "[eval] step 2:" in stdout and "[eval] step 4:" in stdout
    assert "FVD" in stdout and "clips/s" in stdout
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("eval/colour_acc", "eval/direction_acc", "eval/shape_acc", "eval/colour_direction_acc", "eval/fvd",
                "eval/fvd_clips_per_s", "eval/synthetic_clips_per_s", "eval/upsample_psnr",
                "eval/upsample_psnr_baseline", "eval/upsample_ssim", "eval/upsample_fvd"):
        assert tag in tags, tags
        assert [e.step for e in acc.Scalars(tag)] == [2, 4]
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("eval/colour_acc"))
    assert all(e.value >= 0.0 for e in acc.Scalars("eval/fvd"))
    records = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    info = records[-1]["info"]
    assert info["fvd_clips"] == "6" and info["seed"] == "0" and info["fvd_detector"].startswith("standin_i3d.pt@")


def test_evaluate_cli_matches_the_in_loop_numbers_for_the_same_weights(evaluated_run, tmp_path):
    """The CLI on the final checkpoint gives the same scores as the loop's evaluation at that step."""
    out, _ = evaluated_run
    result = tmp_path / "m.json"
    r = _evaluate("--checkpoint", str(out), "--json", str(result))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "colour \\ direction" in r.stdout and "[eval]" in r.stdout
    cli = json.loads(result.read_text())["metrics"]
    loop = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()][-1]
    for key in ("colour_acc", "direction_acc", "shape_acc", "fvd", "upsample_psnr", "upsample_ssim"):
        assert cli[key] == pytest.approx(loop[key], rel=1e-6, abs=1e-9), key


def test_evaluate_cli_flags_override_the_checkpoint_config(evaluated_run, tmp_path):
    out, _ = evaluated_run
    result = tmp_path / "m.json"
    r = _evaluate("--checkpoint", str(out), "--seeds", "2", "--steps", "1", "--set", "eval.fvd_detector=",
                  "--json", str(result))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(result.read_text())
    assert data["info"]["synthetic_prompts"] == "32" and "fvd" not in data["metrics"]


def test_evaluate_cli_scores_each_task_against_held_out_truth_and_its_baseline(evaluated_run, trainer_shards,
                                                                              tmp_path):
    out, _ = evaluated_run
    shards, _ = trainer_shards
    result = tmp_path / "t.json"
    r = _evaluate("--checkpoint", str(out), "--task", "predict", "--task", "interpolate", "--val-shards", shards,
                  "--task-clips", "3", "--synthetic-reader", "--set", "eval.synthetic=false", "--set",
                  "eval.fvd_detector=", "--json", str(result))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(result.read_text())
    m = data["metrics"]
    for task in ("predict", "interpolate"):
        for key in ("psnr", "psnr_baseline", "ssim", "ssim_baseline", "direction_acc", "colour_acc"):
            assert f"{task}_{key}" in m, (task, key)
        assert "3 clips, seed 0" in data["info"][f"{task}_setup"]
    assert "upsample_psnr" not in m and "fvd" not in m
    assert "predict (2 of 4 frames observed" in r.stdout and "(repeat last frame)" in r.stdout
    assert "interpolate PSNR" in r.stdout.splitlines()[-2]  # the [eval] summary line


def test_evaluate_cli_errors_name_the_problem(evaluated_run, tmp_path):
    out, _ = evaluated_run
    r = _evaluate("--checkpoint", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr
    r = _evaluate("--checkpoint", str(out), "--set", "eval.synthetic=false", "--set", "eval.fvd_detector=",
                  "--set", "eval.tasks=[]")
    assert r.returncode == 2 and "nothing to evaluate" in r.stderr
    r = _evaluate("--checkpoint", str(out), "--set", "eval.tasks=[inpaint]")
    assert r.returncode == 2 and "eval.tasks: ['inpaint']" in r.stderr
    r = _evaluate("--checkpoint", str(out), "--set", "eval.synthetic=false",
                  "--fvd-detector", str(tmp_path / "missing_i3d.pt"))
    assert r.returncode == 1 and "missing_i3d.pt" in r.stderr


def test_training_with_eval_but_no_detector_file_fails_at_start(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    cfg = tiny_config(tmp_path / "c.yaml", shards, tmp_path / "run", data={"val_shards": shards},
                      run={"steps": 2, "eval_every": 1}, eval={"fvd_detector": str(tmp_path / "no_i3d.pt")})
    r = run_train(cfg)
    assert r.returncode != 0 and "no_i3d.pt" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "train_log.jsonl").exists()
