"""DDP over gloo with 2 processes (torchrun): gradient accumulation with no_sync, per-rank checkpoint
files, and bitwise-exact resume after kill -9."""

from __future__ import annotations

from trainer_helpers import assert_same_ema, run_train, step_log, tiny_config

from trainer.checkpoint import find_latest, read_state


def test_ddp_two_processes_exact_resume_after_kill9(tmp_path, trainer_shards):
    shards, _ = trainer_shards
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = dict(parallel={"strategy": "ddp"}, optim={"lr": 1e-3, "warmup_steps": 2, "grad_accum": 2},
              data={"batch_size": 1}, run={"steps": 4, "ckpt_every": 2})
    r = run_train(tiny_config(tmp_path / "a.yaml", shards, straight, **kw), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = find_latest(straight)
    names = {p.name for p in ckpt.iterdir()}
    assert {"rng-rank0.pt", "rng-rank1.pt", "dcp", "loader-rank0.json", "loader-rank1.json"} <= names
    state = read_state(ckpt)
    assert state["world_size"] == 2 and state["strategy"] == "ddp"
    assert state["loader"][0]["rank"] == 0 and state["loader"][1]["rank"] == 1

    cfg_b = tiny_config(tmp_path / "b.yaml", shards, resumed, **kw)
    r = run_train(cfg_b, nproc=2, VDM_TEST_KILL_AT_STEP="3")
    assert r.returncode != 0
    assert find_latest(resumed).name == "step-000002"
    r = run_train(cfg_b, nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[resume]" in r.stdout
    a, b = step_log(straight), step_log(resumed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:  # mean loss over both ranks, bitwise
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
    assert_same_ema(straight, resumed, 4, world_size=2)
