"""The real `Trainer` driven in this process on an in-memory loader (no shards, no subprocess), for
documented paths that are awkward to reach from the CLI: the NaN guard giving up after 3 rollbacks,
resuming a checkpoint written by another strategy or process count (and the refusal across
deepspeed), and gradient accumulation skipping DDP's all-reduce on non-final micro-steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from process_group import gloo_group_of_one
from trainer_helpers import tiny_config

from common.config import load_config
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.loop import MAX_ROLLBACKS_PER_CHECKPOINT, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_DIM, TOKENS = 32, 3  # tiny_config: model.text_dim 32


class MemoryLoader:
    """Random batches shaped like data_pipeline.loader's (tiny_config: 4 video + 1 image frame, 8x8).

    From batch `nan_from` on (counted over the whole run, rollbacks included, so "diverged for good")
    every video is NaN. Raises after `limit` batches so a guard that never gives up fails the test
    instead of hanging it."""

    text_dim = TEXT_DIM

    def __init__(self, cfg, *, nan_from: int | None = None, limit: int = 200):
        self.cfg, self.nan_from, self.limit, self.served = cfg, nan_from, limit, 0
        self.gen = torch.Generator().manual_seed(0)

    def __iter__(self):
        while True:
            if self.served >= self.limit:
                raise AssertionError(f"the trainer drew {self.limit} batches: it never gave up")
            b, frames = self.cfg.batch_size, self.cfg.num_frames + self.cfg.num_image_frames
            size = self.cfg.image_size
            video = torch.rand(b, 3, frames, size, size, generator=self.gen) * 2 - 1
            if self.nan_from is not None and self.served >= self.nan_from:
                video = torch.full_like(video, float("nan"))
            self.served += 1
            yield {"video": video, "text_emb": torch.randn(b, TOKENS, TEXT_DIM, generator=self.gen),
                   "text_mask": torch.ones(b, TOKENS, dtype=torch.bool), "num_video_frames": self.cfg.num_frames}

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state) -> None:
        """Recorded, not applied: the NaN-guard test counts every batch drawn, rollbacks included."""
        self.loaded = state


def _cfg(tmp_path, **sections) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tiny_config(tmp_path / "c.yaml", "", tmp_path / "run", **sections)
    return load_config(TrainConfig, path)


def _trainer(cfg: TrainConfig, dist_env: DistEnv | None = None, **loader_kwargs) -> Trainer:
    def factory(data_cfg, rank, world_size, train, **_):
        return MemoryLoader(data_cfg, **loader_kwargs)

    env = dist_env or DistEnv(0, 1, 0, torch.device("cpu"), None)
    return Trainer(cfg, env, loader_factory=factory)


# ---------------------------------------------------------------------------------------- NaN guard
def test_nan_guard_gives_up_after_three_rollbacks_to_the_same_checkpoint(tmp_path, capsys):
    """docs/trainer.md: after run.max_nonfinite_in_row non-finite steps the run reloads the last
    checkpoint, and gives up after 3 rollbacks to the same checkpoint (a clear error, not a loop)."""
    assert MAX_ROLLBACKS_PER_CHECKPOINT == 3  # the number the docs promise
    cfg = _cfg(tmp_path, run={"steps": 50, "ckpt_every": 2, "max_nonfinite_in_row": 2})
    trainer = _trainer(cfg, nan_from=2)  # steps 0, 1 finite (checkpoint at 2), then NaN for good
    with pytest.raises(RuntimeError, match=r"rolled back to \S*step-000002 3 times and still diverging"):
        trainer.train()
    out = capsys.readouterr().out
    for n in (1, 2, 3):
        assert f"rolled back to step-000002 (rollback #{n})" in out
    assert "rollback #4" not in out
    assert trainer.rollbacks == 3
    # 2 good steps, then 4 streaks of 2 NaN steps (3 rolled back, the 4th gives up)
    assert trainer.loader.served == 2 + 4 * 2


def test_a_non_finite_step_updates_neither_the_weights_nor_the_ema(tmp_path):
    """docs/trainer.md, one training step: a step whose loss is not finite is skipped, "no optimizer or
    EMA update" (an EMA moved toward unchanged weights would drift on every skipped step)."""
    trainer = _trainer(_cfg(tmp_path, run={"steps": 4, "ckpt_every": 0}), nan_from=1)
    assert trainer.train_step().ok  # a finite step first: the EMA now trails the weights
    weights = [p.detach().clone() for p in trainer.strategy.local_params()]
    ema = [e.clone() for e in trainer.ema.shadow]
    assert any(not torch.equal(w, e) for w, e in zip(weights, ema))
    out = trainer.train_step()
    assert not out.ok and trainer.state.skipped_steps == 1
    assert all(torch.equal(w, p) for w, p in zip(weights, trainer.strategy.local_params()))
    assert all(torch.equal(e, now) for e, now in zip(ema, trainer.ema.shadow))


# ---------------------------------------------------------------------------------------- late signals
@pytest.mark.parametrize("late", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_after_the_run_ended_is_logged_not_fatal_until_close(tmp_path, caplog, late):
    """Between the end of a run and close() (its last logs) a repeated SIGTERM (SLURM sends a
    preempted task two) or a scheduler's USR1 must not kill the process; close() gives the caller its
    own handlers back."""
    import os
    import signal

    sig = getattr(signal, late)
    theirs = signal.signal(sig, signal.SIG_DFL)
    try:
        trainer = _trainer(_cfg(tmp_path, run={"steps": 1, "ckpt_every": 0}))
        assert trainer.train() == 0
        os.kill(os.getpid(), sig)  # with the default handler this kills pytest itself
        assert f"received {late} after the run ended" in caplog.text
        trainer.close()
        assert signal.getsignal(sig) is signal.SIG_DFL
    finally:
        signal.signal(sig, theirs)


# ---------------------------------------------------------------------------------------- resume refusal
def _checkpointed_run(tmp_path) -> TrainConfig:
    cfg = _cfg(tmp_path, run={"steps": 2, "ckpt_every": 2})
    assert _trainer(cfg).train() == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    return cfg


def _pretend_written_by(tmp_path, **fields) -> None:
    """Rewrite the checkpoint's trainer_state.json as if another strategy or process count wrote it."""
    import json

    path = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _assert_resumed_the_checkpoint(trainer: Trainer, ckpt: Path) -> None:
    """`trainer` holds what `ckpt` saved, not just its step: the model, EMA and AdamW state (compared
    with the checkpoint read directly by dcp_state.read_full, by parameter name), the RNG and every
    rank's loader position."""
    from resume_dump import optimizer_state

    from trainer.checkpoint import read_state
    from trainer.strategies.dcp_state import read_full

    state = read_state(ckpt)
    assert trainer.step == state["step"] == 2
    s = trainer.strategy
    for part, held in (("model", s.gather_full_state()), ("ema", s.gather_full_state(trainer.ema.shadow)),
                       ("optim.state", optimizer_state(trainer))):
        saved = read_full(ckpt, part)
        assert len(saved) > 10 and set(saved) <= set(held), part
        bad = [k for k in saved if not torch.equal(held[k], saved[k])]
        assert not bad, f"{part} differs from the checkpoint in {bad[:5]}"
    saved_model, saved_ema = read_full(ckpt, "model"), read_full(ckpt, "ema")
    assert any(not torch.equal(saved_ema[k], saved_model[k]) for k in saved_ema)  # the EMA is not the weights
    assert torch.equal(torch.get_rng_state(), torch.load(ckpt / "rng-rank0.pt", weights_only=True)["torch"])
    assert trainer.loader.loaded == state["loader"] and state["loader"][0]["served"] >= 2


def test_a_checkpoint_labelled_as_two_fsdp_ranks_resumes_under_ddp_on_one_process(tmp_path):
    """Checkpoints are topology-independent (trainer/strategies/dcp_state.py): what the saving run's
    strategy and process count were no longer decides whether a run can resume it (the real 2-rank
    fsdp reshards are tests/test_elastic_checkpoint.py)."""
    cfg = _checkpointed_run(tmp_path)
    _pretend_written_by(tmp_path, strategy="fsdp", world_size=2)
    cfg.parallel.strategy = "ddp"  # one process: DDP runs unwrapped, so this needs no process group
    _assert_resumed_the_checkpoint(_trainer(cfg), tmp_path / "run" / "checkpoints" / "step-000002")


def test_resume_with_another_strategy_is_refused_naming_both_unless_both_replicate(tmp_path):
    """single and ddp checkpoints hold the same full replicas, so each resumes the other; a sharded
    strategy's checkpoint is refused by them, naming both."""
    cfg = _checkpointed_run(tmp_path)
    cfg.parallel.strategy = "ddp"
    _assert_resumed_the_checkpoint(_trainer(cfg), tmp_path / "run" / "checkpoints" / "step-000002")  # single → ddp
    _pretend_written_by(tmp_path, strategy="deepspeed")
    with pytest.raises(RuntimeError) as e:
        _trainer(cfg)
    msg = str(e.value)
    assert "step-000002 was written by strategy 'deepspeed', this run uses 'ddp'" in msg
    assert "run.init_from" in msg


# ---------------------------------------------------------------------------------------- no_sync

def _all_reduces_in_one_step(tmp_path, accum: int) -> int:
    cfg = _cfg(tmp_path / f"accum{accum}", parallel={"strategy": "ddp"},
               optim={"grad_accum": accum}, run={"steps": 1})
    # DistEnv says 2 so that DDPStrategy wraps the model in DistributedDataParallel (it leaves a lone
    # process unwrapped); the real group has one member, which is all DDP needs to run its all-reduce.
    trainer = _trainer(cfg, DistEnv(0, 2, 0, torch.device("cpu"), "gloo"))
    ddp = trainer.strategy.model
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())  # a group of one: the sum is the buffer itself
        return fut

    ddp.register_comm_hook(None, counting_allreduce)
    trainer.train_step()
    return len(calls)


def test_grad_accum_all_reduces_only_on_the_final_micro_step(tmp_path):
    """docs/trainer.md, strategies/base.py: non-final accumulation micro-steps run under no_sync, so
    DDP all-reduces the gradient buckets once per optimizer step, not once per micro-batch."""
    with gloo_group_of_one():
        per_sync = _all_reduces_in_one_step(tmp_path, accum=1)
        assert per_sync > 0
        assert _all_reduces_in_one_step(tmp_path, accum=3) == per_sync


# ---------------------------------------------------------------------------------------- plan at start
def test_the_run_logs_its_plan_beside_what_it_measures(tmp_path, capsys):
    """run.plan_at_start: the planner runs on this run's own setting in a subprocess, and its per-rank
    memory and step time are printed next to the measured ones at a log after it is ready."""
    cfg = _cfg(tmp_path, run={"steps": 2, "log_every": 1, "plan_at_start": 1, "peak_tflops": 1.0,
                              "ckpt_every": 1000})
    trainer = _trainer(cfg)
    plan = trainer._plan
    plan._proc.wait(timeout=300)  # ready before the first log
    trainer.train()
    trainer.close()
    assert not Path(plan._out.name).exists() and not Path(plan._config_file).exists()  # no files left behind
    out = capsys.readouterr().out
    planned = [line for line in out.splitlines() if line.startswith("[plan]")]
    assert len(planned) == 2, out[-3000:]
    assert "planned per-rank peak" in planned[0] and "measured peak" in planned[0]
    assert "planned step" in planned[1] and "at MFU" in planned[1]
