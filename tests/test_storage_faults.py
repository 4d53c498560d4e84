"""Storage faults on real filesystems (issue 23), driven in this process on the single strategy: a tmpfs
out_dir that fills during a save (stopped before writing, failing mid-write, failing in the background),
a full step log, and truncated, missing and same-size-corrupted checkpoint files. The 2-rank launches
of ddp, fsdp and deepspeed are tests/test_storage_faults_dist.py.

Every resume is checked against the EMA of the uninterrupted run's checkpoint of the same step: bitwise
equal, so a fallback loses nothing and loads nothing damaged."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from trainer_helpers import saved_tensors, tiny_config

from common.config import load_config
from common.exit_codes import EXIT_DISK_FULL, EXIT_REQUEUE
from trainer import checkpoint as ckpt
from trainer.callbacks import Callback
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.loop import Trainer
from trainer.storage import CheckpointDamaged, DiskFull

pytestmark = pytest.mark.usefixtures("one_thread")
DATA_FILE = "dcp/__0_0.distcp"  # the single strategy's tensors (~4.9 MB of a ~5.2 MB checkpoint)
STEP2, STEP4 = ckpt.step_dir_name(2), ckpt.step_dir_name(4)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real small filesystem at `path` (tests run as root here and in CI; under CI=true a skip is a
    failure, tests/conftest.py)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} ({r.stderr.strip()}): the full-disk tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _cfg(trainer_shards, out_dir: Path, **run) -> TrainConfig:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = tiny_config(out_dir.parent / f"{out_dir.name}.yaml", trainer_shards[0], out_dir,
                       run={"steps": 4, "keep_last": 3, **run})
    return load_config(TrainConfig, path)


def _train(cfg: TrainConfig, *callbacks: Callback) -> int:
    """One thread in every run, the module-scoped reference run included (it is set up before the
    function-scoped one_thread fixture): bitwise comparisons need the same reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    trainer.callbacks.callbacks += list(callbacks)
    try:
        return trainer.train()
    finally:
        trainer.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(trainer_shards, tmp_path_factory):
    """A 4-step run (checkpoints at steps 2 and 4) and the EMA of its step-4 checkpoint."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _train(_cfg(trainer_shards, out)) == 0
    return out, saved_tensors(out / "checkpoints" / STEP4, "ema")


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_ema_equal(out_dir: Path, reference: dict) -> None:
    ema = saved_tensors(Path(out_dir) / "checkpoints" / STEP4, "ema")
    assert sorted(ema) == sorted(reference)
    assert all(torch.equal(ema[k], reference[k]) for k in ema), "EMA differs from the uninterrupted run"


# ------------------------------------------------------------------------------------ damage kinds
def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_middle(path: Path, n: int = 4096) -> None:
    """Same size, other bytes: what a bad disk or a faulty copy leaves."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        block = f.read(n)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))


def test_verification_finds_truncated_missing_and_same_size_corrupted_files(uninterrupted, tmp_path):
    src = uninterrupted[0] / "checkpoints" / STEP4
    assert ckpt.verify_checkpoint(src) == []
    state = ckpt.read_state(src)
    assert state["files"]["algorithm"] == "crc32" and DATA_FILE in state["files"]["files"]
    assert ckpt.STATE_FILE not in state["files"]["files"]  # written last, after the manifest
    cases = {"truncated": (truncate, "bytes"), "missing": (Path.unlink, "missing"),
             "corrupted": (flip_middle, "crc32")}
    for kind, (damage, said) in cases.items():
        c = shutil.copytree(src, tmp_path / kind)
        damage(c / DATA_FILE)
        problems = ckpt.verify_checkpoint(c)
        assert len(problems) == 1 and problems[0].startswith(DATA_FILE) and said in problems[0], (kind, problems)
        # sizes are checked even without checksums; same-size damage needs the checksum
        assert bool(ckpt.verify_checkpoint(c, checksums=False)) == (kind != "corrupted")
        with pytest.raises(CheckpointDamaged, match=DATA_FILE):
            ckpt.require_verified(c)  # trainer.export / trainer.evaluate


def test_damaged_latest_falls_back_to_the_previous_checkpoint_bitwise(uninterrupted, trainer_shards, tmp_path,
                                                                      capsys):
    """Same-size corruption of the latest checkpoint (which loaded silently before): resume_strict
    refuses naming the file; otherwise the rerun warns naming both checkpoints, resumes from step 2,
    and its step-4 EMA is bitwise the uninterrupted run's. A stale temp directory goes at start-up."""
    out = _copy_run(uninterrupted[0], tmp_path / "run")
    flip_middle(out / "checkpoints" / STEP4 / DATA_FILE)
    stale = out / "checkpoints" / "step-000006.tmp-12345"
    stale.mkdir()
    (stale / "half-written").write_bytes(b"x" * 1000)
    with pytest.raises(CheckpointDamaged, match=rf"{STEP4}.*{DATA_FILE}.*resume_strict=true refuses"):
        _train(_cfg(trainer_shards, out, resume_strict=True))
    assert _train(_cfg(trainer_shards, out)) == 0
    printed = capsys.readouterr().out
    assert f"{STEP4} is damaged ({DATA_FILE}: crc32" in printed
    assert f"resuming from {STEP2} instead" in printed and f"[resume] {out / 'checkpoints' / STEP2}" in printed
    assert "removed 1 unfinished checkpoint write(s): step-000006.tmp-12345" in printed and not stale.exists()
    _assert_ema_equal(out, uninterrupted[1])
    assert ckpt.verify_checkpoint(out / "checkpoints" / STEP4) == []


def test_a_checkpoint_that_fails_to_load_is_dropped_and_the_trainer_rebuilt(uninterrupted, trainer_shards, tmp_path,
                                                                             capsys):
    """A latest checkpoint with nothing to verify against (written before the manifest) whose data file
    is truncated: the load fails part-way (DCP's bare EOFError), the trainer is built again from
    scratch without it and resumes from step 2, bitwise: nothing of the half-load survives."""
    out = _copy_run(uninterrupted[0], tmp_path / "run")
    latest = out / "checkpoints" / STEP4
    state = ckpt.read_state(latest)
    del state["files"]
    (latest / ckpt.STATE_FILE).write_text(json.dumps(state))
    truncate(latest / DATA_FILE)
    assert _train(_cfg(trainer_shards, out)) == 0
    printed = capsys.readouterr().out
    assert f"{latest} could not be loaded: rank 0:" in printed and "building the trainer again without it" in printed
    _assert_ema_equal(out, uninterrupted[1])


def test_no_checkpoint_that_verifies_lists_what_was_tried(uninterrupted, trainer_shards, tmp_path):
    out = _copy_run(uninterrupted[0], tmp_path / "run")
    truncate(out / "checkpoints" / STEP4 / DATA_FILE)
    (out / "checkpoints" / STEP2 / DATA_FILE).unlink()
    with pytest.raises(CheckpointDamaged, match=rf"no checkpoint .* can be resumed; tried: {STEP4}: {DATA_FILE}: "
                                                rf".* bytes.*; {STEP2}: {DATA_FILE}: missing"):
        _train(_cfg(trainer_shards, out))


# ------------------------------------------------------------------------------------ full disk
@pytest.mark.parametrize("mode", ["stop", "warn-sync", "warn-async"])
def test_a_full_disk_during_a_save_is_named_and_loses_nothing(mode, uninterrupted, trainer_shards, tmp_path):
    """out_dir on a tmpfs with room for one checkpoint and a half: the step-4 save stops the run with
    DiskFull (exit code 74) naming the filesystem, the size needed and the intact step-2 checkpoint:
    before writing (run.on_low_disk=stop), when the write fails (warn), or at the next poll of a
    background save (warn + async). The run then resumes on a roomy disk with nothing lost."""
    assert EXIT_DISK_FULL == 74 and EXIT_DISK_FULL != EXIT_REQUEUE
    on_low_disk = mode.split("-")[0]
    with tmpfs(tmp_path / "small", "8m") as small:
        out = small / "run"
        cfg = _cfg(trainer_shards, out, on_low_disk=on_low_disk, async_save=mode == "warn-async")
        with pytest.raises(DiskFull) as raised:
            _train(cfg)
        message = str(raised.value)
        assert raised.value.exit_code == EXIT_DISK_FULL
        assert f"checkpoint {STEP4} " in message and f"filesystem tmpfs (tmpfs) mounted on {small}" in message
        assert f"needs about 4.9 MiB (the size of {STEP2})" in message
        assert f"The previous checkpoint {STEP2} is intact" in message and "rerun the same command" in message
        if on_low_disk == "stop":
            assert "run.on_low_disk=stop" in message
        assert ckpt.find_latest(out).name == STEP2
        assert not list((out / "checkpoints").glob("*.tmp-*"))  # the failed write took its temp dir along
        roomy = _copy_run(out, tmp_path / "roomy")
    if mode == "warn-async":
        cfg.run.out_dir = str(roomy)
        assert _train(cfg) == 0
        _assert_ema_equal(roomy, uninterrupted[1])


class FillDiskAtStep(Callback):
    def __init__(self, path: Path, step: int):
        self.path, self.step = path, step

    def on_step_start(self, trainer) -> None:
        if trainer.step == self.step:
            with contextlib.suppress(OSError), open(self.path, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)


def test_a_step_log_that_cannot_be_written_stops_the_run(trainer_shards, tmp_path):
    """The disk fills up between checkpoints: the step log's write fails, and the run stops with one
    message naming train_log.jsonl and the filesystem instead of training on without a record."""
    with tmpfs(tmp_path / "small", "2m") as small:
        # no TensorBoard write and no checkpoint before the log's first page (~20 lines) is full
        cfg = _cfg(trainer_shards, small / "run", steps=60, ckpt_every=100, log_every=100)
        with pytest.raises(DiskFull, match=rf"could not write the step log {small}/run/train_log.jsonl "
                                           rf"\(filesystem tmpfs .*No space left on device; the run stops"):
            _train(cfg, FillDiskAtStep(small / "filler", step=1))
        logged = len((small / "run" / "train_log.jsonl").read_text().splitlines())
        assert 2 < logged < 60, logged


def test_tensorboard_and_export_on_a_full_disk_say_so_in_one_line(uninterrupted, tmp_path, capfd):
    """TensorBoard's writer thread fails on a full disk: Metrics keeps one DiskFull naming tb/ (the
    thread's own traceback is not printed); trainer.export says the same of its output file, exit 74,
    and refuses a damaged checkpoint naming the file."""
    from trainer.export import main as export_main
    from trainer.metrics import Metrics

    with tmpfs(tmp_path / "small", "64k") as small:
        metrics = Metrics(small / "run", enabled=True)
        for step in range(5000):
            metrics.scalars({"train/loss": 1.0}, step)
            metrics.flush()
            if metrics.fault is not None:
                break
        metrics.close()
        assert isinstance(metrics.fault, DiskFull), metrics.fault
        assert str(metrics.fault).startswith(f"could not write TensorBoard events to {small}/run/tb (filesystem tmpfs")
        assert "Traceback" not in capfd.readouterr().err
        code = export_main(["--checkpoint", str(uninterrupted[0]), "--out", str(small / "model.safetensors")])
        err = capfd.readouterr().err
        assert code == EXIT_DISK_FULL and f"export: could not write the exported weights to {small}/model.safetensors" \
               in err and "No space left on device" in err, err
        assert not (small / "model.safetensors").exists()
    damaged = _copy_run(uninterrupted[0], tmp_path / "damaged")
    truncate(damaged / "checkpoints" / STEP4 / DATA_FILE)
    assert export_main(["--checkpoint", str(damaged), "--out", str(tmp_path / "m.safetensors")]) == 1
    assert f"{STEP4} is damaged: {DATA_FILE}:" in capfd.readouterr().err
