"""Issue 10 item 4: checkpoints written in the background (`run.async_save`).

In-process: what is written is the state at the save (the next steps' in-place updates do not reach
it) and equals a synchronous checkpoint bitwise; the checkpoint becomes the latest only once every
rank's files are written; a failed write keeps the previous checkpoint and raises at the next wait.
Through the real CLI: 2-rank fsdp and DeepSpeed runs SIGKILLed while their step-4 checkpoint is being
written resume from step 2 and log the uninterrupted run's batch_digest at every step.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from process_group import MULTI_PROCESS_TIMEOUT_S
from torch import nn
from trainer_helpers import run_in_group, step_log, tiny_config, train_cmd

from trainer import async_write
from trainer.checkpoint import (
    STATE_FILE,
    PendingCheckpoint,
    find_latest,
    read_state,
    save_checkpoint,
    start_checkpoint,
)
from trainer.strategies.dcp_state import read_full

TIMEOUT = MULTI_PROCESS_TIMEOUT_S


# ------------------------------------------------------------------ in-process (one rank)
def _trained_single():
    from trainer.config import TrainConfig
    from trainer.distributed import init_distributed
    from trainer.ema import EMA
    from trainer.strategies.base import build_strategy

    cfg = TrainConfig()
    cfg.run.precision = "fp32"
    torch.manual_seed(0)
    strategy = build_strategy(cfg, init_distributed())
    strategy.setup(nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Linear(16, 2)))
    ema = EMA(strategy.local_params(), 0.5)
    _step(strategy, ema)
    return strategy, ema


def _step(strategy, ema) -> None:
    strategy.model(torch.randn(5, 3)).square().sum().backward()
    strategy.optimizer_step()
    strategy.zero_grad()
    ema.update(strategy.local_params())


def _save(strategy, ema, out: Path, step: int, background: bool) -> PendingCheckpoint:
    return start_checkpoint(strategy, out, step, ema=ema, loader_state={"pos": step}, state={}, keep_last=2,
                            background=background)


def _saved(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {part: read_full(ckpt, part) for part in ("model", "ema", "optim.state")}


def _assert_equal(a: dict, b: dict) -> None:
    for part in a:
        assert sorted(a[part]) == sorted(b[part]) and a[part], part
        bad = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not bad, f"{part} differs: {bad}"


def test_background_checkpoint_holds_the_state_at_the_save_and_equals_a_synchronous_one(tmp_path):
    strategy, ema = _trained_single()
    sync = save_checkpoint(strategy, tmp_path / "sync", 1, ema=ema, loader_state={"pos": 1}, state={}, keep_last=2)
    pending = _save(strategy, ema, tmp_path / "async", 1, background=True)
    for _ in range(3):  # training goes on while the files are written
        _step(strategy, ema)
    final = pending.wait(strategy)
    assert final.name == "step-000001" and find_latest(tmp_path / "async") == final
    saved = _saved(final)
    _assert_equal(saved, _saved(sync))
    # the live state has moved on: a write that read the live tensors would differ from the sync one
    live = dict(strategy.module.named_parameters())
    assert any(not torch.equal(saved["model"][k], live[k].detach()) for k in saved["model"])
    assert read_state(final)["loader"] == [{"pos": 1}]


def test_background_save_with_a_process_group_writes_over_a_gloo_group_of_its_own(tmp_path):
    """Under a process group (here gloo, one rank; on GPUs the default group is NCCL, which DCP cannot
    use for a CPU-side save) the writer coordinates over a separate gloo group."""
    import torch.distributed as dist
    from process_group import gloo_group_of_one

    with gloo_group_of_one():
        strategy, ema = _trained_single()
        pending = _save(strategy, ema, tmp_path, 1, background=True)
        group = strategy.background_group()
        assert group is not None and group is not dist.group.WORLD and dist.get_backend(group) == "gloo"
        assert strategy.background_group() is group  # made once
        _step(strategy, ema)
        final = pending.wait(strategy)
    assert find_latest(tmp_path) == final and sorted(_saved(final)["model"])


def _gated(strategy) -> Future:
    """Make strategy.save return a future the test completes (the write is 'still going')."""
    gate: Future = Future()
    real = strategy.save

    def save(ckpt_dir, ema=None, background=False):
        real(ckpt_dir, ema=ema, background=background).result()
        return gate

    strategy.save = save
    return gate


def test_background_checkpoint_becomes_the_latest_only_when_its_files_are_written(tmp_path):
    strategy, ema = _trained_single()
    first = _save(strategy, ema, tmp_path, 1, background=False).wait(strategy)
    gate = _gated(strategy)
    _step(strategy, ema)
    pending = _save(strategy, ema, tmp_path, 2, background=True)
    assert not pending.poll() and not pending.poll()
    assert find_latest(tmp_path) == first  # a kill now resumes from step 1
    assert pending.tmp.is_dir() and not (pending.tmp / STATE_FILE).exists()
    gate.set_result(None)
    assert pending.poll()
    assert find_latest(tmp_path).name == "step-000002" and read_state(find_latest(tmp_path))["step"] == 2
    assert not pending.tmp.exists() and not list(find_latest(tmp_path).glob(".written-rank*"))
    assert pending.wait(strategy) == find_latest(tmp_path)  # after a commit by poll: no second commit


def test_commit_waits_for_every_ranks_mark(tmp_path):
    """Rank 0 commits without a collective: it reads each rank's mark in the temporary directory."""
    tmp, final = tmp_path / "checkpoints" / "step-000003.tmp-1", tmp_path / "checkpoints" / "step-000003"
    tmp.mkdir(parents=True)
    pending = PendingCheckpoint(tmp_path, tmp, final, rank=0, world=2, keep_last=1, writes=async_write.done())
    pending.trainer_state = {"step": 3}
    assert (tmp / ".written-rank0").exists() and not pending.poll()
    (tmp / ".written-rank1").touch()  # rank 1's writer thread finished
    assert pending.poll() and find_latest(tmp_path) == final and read_state(final)["step"] == 3


def test_failed_background_write_keeps_the_previous_checkpoint_and_raises_at_the_wait(tmp_path, caplog):
    strategy, ema = _trained_single()
    first = _save(strategy, ema, tmp_path, 1, background=False).wait(strategy)
    gate = _gated(strategy)
    pending = _save(strategy, ema, tmp_path, 2, background=True)
    gate.set_exception(OSError(28, "No space left on device"))
    with caplog.at_level(logging.ERROR):
        assert not pending.poll()
    assert "step-000002 could not be written" in caplog.text and "No space left on device" in caplog.text
    with pytest.raises(RuntimeError, match="step-000002 could not be written.*No space left on device"):
        pending.wait(strategy)
    assert find_latest(tmp_path) == first and not pending.tmp.exists()


def test_stage_copies_tensors_and_keeps_containers():
    from collections import OrderedDict

    flat = torch.arange(6.0)
    sd = OrderedDict(a=flat[:3], b=[flat[3:], (flat, 7)], c="text")
    sd._metadata = {"": {"version": 1}}
    staged = async_write.stage(sd)
    flat.add_(100)
    assert type(staged) is OrderedDict and staged._metadata == {"": {"version": 1}}
    assert staged["a"].tolist() == [0, 1, 2] and staged["b"][0].tolist() == [3, 4, 5]
    assert staged["b"][1][0].tolist() == list(range(6)) and staged["b"][1][1] == 7 and staged["c"] == "text"


def test_host_copies_are_reused_across_saves_and_keep_views_of_one_storage_together(tmp_path):
    flat = torch.arange(8.0)
    halves = {"a": flat[:4], "b": flat[4:], "small": torch.arange(100.0)[:3], "w": torch.ones(2, 2)}
    host = async_write.HostCopies()
    first = async_write.stage(halves, host)
    assert first["a"].untyped_storage().data_ptr() == first["b"].untyped_storage().data_ptr()  # one buffer
    assert first["small"].untyped_storage().nbytes() == 12  # a small view of a big storage: itself only
    flat.add_(100)
    halves["w"].mul_(3)
    second = async_write.stage(halves, host)
    assert second["a"].data_ptr() == first["a"].data_ptr() and second["w"].data_ptr() == first["w"].data_ptr()
    assert second["a"].tolist() == [100, 101, 102, 103] and second["b"].tolist() == [104, 105, 106, 107]
    assert second["w"].tolist() == [[3, 3], [3, 3]] and second["small"].tolist() == [0, 1, 2]
    torch.save(second, tmp_path / "x.pt")
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert all(torch.equal(back[k], halves[k]) for k in halves)


def test_all_of_fails_with_the_first_failure_and_waits_for_all():
    a, b = Future(), Future()
    joined = async_write.all_of([a, b])
    a.set_result(None)
    assert not joined.done()
    b.set_exception(ValueError("b broke"))
    assert isinstance(joined.exception(timeout=1), ValueError)
    assert async_write.all_of([]).done()


# ------------------------------------------------------------------ real CLI, SIGKILL mid-write
LAYOUT = {1: {"batch_size": 2}, 2: {"batch_size": 1}}  # global batch 2 on 1 and 2 ranks


def _config(path: Path, shards: str, out: Path, strategy: str, nproc: int, async_save: bool) -> Path:
    return tiny_config(path, shards, out, parallel={"strategy": strategy, "zero_stage": 2}, data=LAYOUT[nproc],
                       run={"steps": 4, "ckpt_every": 2, "async_save": async_save})


def _digests(out: Path) -> list[str]:
    log = step_log(out)
    assert sorted(log) == list(range(len(log)))
    return [log[s]["batch_digest"] for s in sorted(log)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trainer_shards) -> list[str]:
    tmp = tmp_path_factory.mktemp("sync")
    r = run_in_group(train_cmd(_config(tmp / "c.yaml", trainer_shards[0], tmp / "run", "single", 1, False)), TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return _digests(tmp / "run")


@pytest.mark.parametrize("strategy,resume_nproc", [("fsdp", 2), ("deepspeed", 1)])
def test_kill_during_a_background_save_resumes_from_the_previous_checkpoint(
        tmp_path, trainer_shards, reference, strategy, resume_nproc):
    shards, out = trainer_shards[0], tmp_path / "run"
    config = _config(tmp_path / "c.yaml", shards, out, strategy, 2, True)
    r = run_in_group(train_cmd(config, nproc=2), TIMEOUT, VDM_TEST_KILL_IN_SAVE_AT_STEP="4")
    assert r.returncode != 0 and "killed inside the save of step 4" in r.stdout, r.stdout + r.stderr
    assert "[ckpt] writing step-000002 in the background" in r.stdout
    latest = find_latest(out)
    assert latest.name == "step-000002" and read_state(latest)["step"] == 2
    unfinished = list((out / "checkpoints").glob("step-000004.tmp-*"))
    assert len(unfinished) == 1 and not (unfinished[0] / STATE_FILE).exists()

    resumed = _config(tmp_path / "r.yaml", shards, out, strategy, resume_nproc, True)
    r = run_in_group(train_cmd(resumed, nproc=resume_nproc), TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[resume]" in r.stdout and "step-000002" in r.stdout
    assert _digests(out) == reference
    assert read_state(find_latest(out))["step"] == 4
    assert not list((out / "checkpoints").glob("*.tmp-*"))  # the stale write was cleaned up
    shutil.rmtree(out)
