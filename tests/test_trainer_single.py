"""`python -m trainer.train` in one process on real shards: TensorBoard output, exact resume after
kill -9, SIGUSR1/SIGTERM → checkpoint + exit 75, a kill during a checkpoint write, and the NaN guard."""

from __future__ import annotations

import math
import signal
import subprocess
from pathlib import Path

import av
import pytest
from trainer_helpers import (
    REPO,
    all_finite,
    assert_same_ema,
    run_train,
    step_log,
    subprocess_env,
    tiny_config,
    train_cmd,
    wait_for_line,
)

from trainer.checkpoint import find_latest, read_state


def _events(out_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_single_run_writes_tensorboard_samples_and_checkpoints(tmp_path, trainer_shards):
    shards, bert = trainer_shards
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", shards, out,
                      data={"val_shards": shards},
                      run={"val_every": 2, "val_batches": 1, "sample_every": 4, "sample_steps": 2,
                           "sample_prompts": ["a red square moving right", "a blue circle moving up"]})
    r = run_train(cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 4/4 | loss" in r.stdout and "ETA" in r.stdout

    acc = _events(out)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "perf/samples_per_s",
                "perf/videos_per_s", "perf/step_time_s", "perf/data_wait_s", "perf/peak_mem_gb", "val/loss", "val/loss_band_mean"):
        assert tag in scalars, (tag, sorted(scalars))
        assert all_finite(e.value for e in acc.Scalars(tag)), tag
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    for tag in ("data/skipped_samples", "data/filtered_samples", "data/skipped_shards"):  # clean local shards
        assert [e.value for e in acc.Scalars(tag)] == [0.0] * 4, tag
    assert any(t.startswith("train/loss_band/lsnr_") for t in scalars)
    val_bands = [t for t in scalars if t.startswith("val/loss_band/")]
    assert len(val_bands) == 8  # fixed bands of width 5 over [-20, 20]
    assert acc.Scalars("perf/peak_mem_gb")[-1].value > 0.01
    assert {"samples/0", "samples/1"} <= set(acc.Tags()["images"])
    gif = acc.Images("samples/0")[-1].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")

    samples = sorted((out / "samples" / "step-000004").glob("*.mp4"))
    assert len(samples) == 2
    with av.open(str(samples[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4

    latest = find_latest(out)
    assert latest.name == "step-000004"
    names = {p.name for p in latest.iterdir()}
    # model, AdamW state and EMA by parameter name in dcp/ (topology-independent, docs/trainer.md)
    assert {"trainer_state.json", "rng-rank0.pt", "loader-rank0.json", "dcp", "scaler.pt", "config.yaml"} <= names
    assert not names & {"model.pt", "optimizer.pt", "ema-rank0.pt"}
    state = read_state(latest)
    assert state["step"] == 4 and state["config"]["run"]["out_dir"] == str(out)
    assert state["text_encoder"] == bert  # from the shards' index.json
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]


def test_exact_resume_after_kill9_single(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    data = {"num_workers": 0}  # in-process loading keeps the three runs quick; workers: the next test
    r = run_train(tiny_config(tmp_path / "a.yaml", shards, straight, data=data))
    assert r.returncode == 0, r.stderr
    cfg_b = tiny_config(tmp_path / "b.yaml", shards, resumed, data=data)
    r = run_train(cfg_b, VDM_TEST_KILL_AT_STEP="3")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert find_latest(resumed).name == "step-000002"
    r = run_train(cfg_b)
    assert r.returncode == 0, r.stderr
    assert "[resume]" in r.stdout and "step-000002" in r.stdout
    a, b = step_log(straight), step_log(resumed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:  # bitwise: JSON keeps the full float repr
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
    assert_same_ema(straight, resumed, 4)


def test_kill9_of_trainer_takes_its_forkserver_loader_workers_down(tmp_path, trainer_shards):
    """Forkserver loader workers are not the trainer's children and keep the forkserver alive, so
    torch's parent watchdog never fires for them; they must still exit when the trainer is killed.
    They inherit its stdout: the pipe reaching EOF means every one of them is gone."""
    shards, _ = trainer_shards
    cfg = tiny_config(tmp_path / "w.yaml", shards, tmp_path / "run", data={"num_workers": 2})
    proc = subprocess.Popen(train_cmd(cfg), cwd=REPO, env=subprocess_env(VDM_TEST_KILL_AT_STEP="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.wait(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("loader workers of the SIGKILLed trainer still hold its stdout 30 s later")
    assert "step 2/4" in output  # the workers did deliver batches before the kill


@pytest.mark.parametrize("sig,async_save", [(signal.SIGUSR1, False), (signal.SIGTERM, True)],
                         ids=["usr1", "term-async-save"])
def test_stop_signal_checkpoints_and_exits_75_then_resumes(tmp_path, trainer_shards, sig, async_save):
    """SIGUSR1 (preemption notice) and SIGTERM (scancel, preemption): the real trainer saves and exits
    75 either way; whether to requeue is the launcher's decision (TERM: never, see test_slurm_cluster).
    With run.async_save the stop checkpoint is written in the background and waited for before exit."""
    shards, _ = trainer_shards
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", shards, out, run={"steps": 1000, "ckpt_every": 0, "async_save": async_save})
    proc = subprocess.Popen(train_cmd(cfg), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    wait_for_line(proc, "step 1/1000", lines)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 75, output
    assert f"received {sig.name}" in output and "exiting with 75" in output
    assert ("in the background" in output) == async_save
    latest = find_latest(out)
    step = read_state(latest)["step"]
    assert 1 <= step < 1000 and latest.name == f"step-{step:06d}"
    r = run_train(cfg, f"run.steps={step + 1}")
    assert r.returncode == 0, r.stderr
    assert f"at step {step}" in r.stdout
    assert max(step_log(out)) == step


def test_kill_during_checkpoint_write_keeps_previous_loadable(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", shards, out, run={"steps": 2, "ckpt_every": 2})
    assert run_train(cfg).returncode == 0
    proc = subprocess.Popen(train_cmd(cfg, "run.steps=4"), cwd=REPO, env=subprocess_env(VDM_TEST_SLEEP_IN_SAVE="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    wait_for_line(proc, "CHECKPOINT-WRITE-IN-PROGRESS", lines)
    proc.kill()
    proc.wait(timeout=30)
    root = out / "checkpoints"
    assert list(root.glob("step-000004.tmp-*")), "the partial checkpoint should be left as a temp dir"
    assert not (root / "step-000004").exists()
    assert (root / "latest").read_text().strip() == "step-000002"
    r = run_train(cfg, "run.steps=4")
    assert r.returncode == 0, r.stderr
    assert "step-000002 at step 2" in r.stdout
    assert find_latest(out).name == "step-000004"
    assert not list(root.glob("*.tmp-*"))  # the next save cleans stale temp dirs


def test_nan_batches_are_skipped_then_rolled_back(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", shards, out,
                      run={"steps": 6, "ckpt_every": 2, "max_nonfinite_in_row": 2})
    r = run_train(cfg, VDM_TEST_NAN_STEPS="1,4,5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[nan-guard] step 1: non-finite loss" in r.stdout
    # the checkpoint due at step 2 waits for a finite step (no checkpoints inside a non-finite streak)
    assert "step-000002" not in r.stdout and "saved " + str(out / "checkpoints" / "step-000003") in r.stdout
    assert "rolled back to step-000004" in r.stdout
    log_lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == 6 + 2  # steps 4 and 5 ran twice
    final = step_log(out)
    assert final[1]["skipped"] and not math.isfinite(final[1]["loss"])
    assert all(not final[s]["skipped"] and math.isfinite(final[s]["loss"]) for s in (0, 2, 3, 4, 5))
    acc = _events(out)
    assert acc.Scalars("train/rollbacks")[-1].value == 1
    assert acc.Scalars("train/skipped_steps")[-1].value == 3
    assert read_state(find_latest(out))["rollbacks"] == 1


def test_bad_config_key_and_text_dim_mismatch_are_named(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    cfg = tiny_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    r = run_train(cfg, "run.nope=1")
    assert r.returncode == 2 and "unknown config key run.nope" in r.stderr
    r = run_train(cfg, "model.text_dim=48")
    assert r.returncode == 1
    assert "hold 32-d text embeddings but model.text_dim is 48" in r.stderr
