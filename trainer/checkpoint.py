"""Checkpoints that survive preemption: atomic, self-describing, and enough for bitwise-exact resume.

Layout (out_dir/checkpoints/):
    step-000100/            whatever strategy.save writes: single/ddp/fsdp `dcp/` (model, optimizer and
                            EMA by parameter name, any world size reads it) + scaler; deepspeed its
                            engine files + ema-rank{r}.pt (EMA of rank r's ZeRO fragments)
        trainer_state.json  step, counters, loader state of every rank, resolved config; written
                            LAST, so its presence marks a complete checkpoint
        rng-rank{r}.pt      torch CPU/CUDA, numpy and python RNG states of rank r
        loader-rank{r}.json the data loader position of rank r
    latest                  text file naming the last complete checkpoint directory

Resume works on another world size and across single/ddp/fsdp (DCP reshards), and for deepspeed on
another world size or ZeRO stage (universal checkpoint); ranks the saved run did not have keep their
fresh RNG seeds and take rank 0's loader entry (the loader itself reads every rank's state).

A checkpoint is written into `step-000100.tmp-<pid>` and renamed only when every rank has finished,
so a kill at any moment leaves the previous checkpoint and `latest` intact; stale temp directories
are removed when the run starts again and by every save. trainer_state.json lists every other file
with its size and CRC-32 (trainer/checkpoint_verify.py), so a damaged checkpoint is found before it
is loaded (`verify_checkpoint`; trainer.checkpoint_manager.choose_resume falls back past it); a save
that fails for lack of space raises trainer.storage.DiskFull, which names the filesystem, the space
needed and the intact previous checkpoint. Everything loads with `torch.load(weights_only=True)` /
JSON: RNG states are stored as tensors and plain lists, never pickled objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from trainer import async_write, checkpoint_verify, storage

log = logging.getLogger(__name__)

# strategies whose checkpoint holds full replicas: resumable on another process count or by each other
REPLICATED = {"single", "ddp"}
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
LATEST = "latest"
WRITTEN, FAILED = ".written-rank", ".failed-rank"  # a rank's background writes finished / failed
MANIFEST_WAIT_S = 0.2  # how long poll() waits for a background save's checksums before the next step
# what a failed read or write of checkpoint files raises: DCP's CheckpointException is a BaseException
ERRORS = (Exception, CheckpointException)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ find
def is_complete(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and (ckpt_dir / STATE_FILE).is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def remove_stale_temp_dirs(out_dir: str | Path, keep: Path | None = None) -> list[str]:
    """Delete the temporary directories of saves that never finished (a kill, a full disk); not
    collective: rank 0 calls it before a save and when a run starts. Returns their names."""
    root = checkpoint_root(out_dir)
    removed = []
    for stale in sorted(root.glob("step-*.tmp-*")) if root.is_dir() else []:
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale.name)
    return removed


def newest_first(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints to resume from, in order of preference: the one `latest` names, then the
    others newest first."""
    ckpts = list_checkpoints(out_dir)[::-1]
    latest = find_latest(out_dir)
    return ([latest] if latest is not None else []) + [c for c in ckpts if c != latest]


def find_latest(out_dir: str | Path) -> Path | None:
    """The checkpoint named by `latest`, else the newest complete one (the pointer may be missing if a
    kill hit between rename and pointer update)."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a `checkpoints/` root or a run's out_dir → one complete checkpoint dir."""
    path = Path(path)
    if is_complete(path):
        return path
    out_dir = path.parent if path.name == "checkpoints" else path
    found = find_latest(out_dir) if (out_dir / "checkpoints").is_dir() else None
    if found is not None:
        return found
    raise FileNotFoundError(f"{path}: no complete checkpoint (a step-* directory with {STATE_FILE})")


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


# ------------------------------------------------------------------------------------------ save / load
def save_checkpoint(strategy, out_dir: str | Path, step: int, *, ema, loader_state: dict | None,
                    state: dict[str, Any], keep_last: int, during_write: Callable[[], None] | None = None,
                    files: dict[str, str] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. `during_write` runs on
    every rank once its files are in the temporary directory, before the rename (a callback's hook);
    `files` (name -> text) are written into the checkpoint by rank 0."""
    pending = start_checkpoint(strategy, out_dir, step, ema=ema, loader_state=loader_state, state=state,
                               keep_last=keep_last, during_write=during_write, files=files, background=False)
    return pending.wait(strategy)


def start_checkpoint(strategy, out_dir: str | Path, step: int, *, ema, loader_state: dict | None,
                     state: dict[str, Any], keep_last: int, during_write: Callable[[], None] | None = None,
                     files: dict[str, str] | None = None, background: bool = True) -> PendingCheckpoint:
    """Collective. Stages the state and returns once the large files are being written (by background
    threads when `background`); the checkpoint becomes the latest only when `PendingCheckpoint.poll`
    (rank 0, between steps) or `.wait` (collective) finds every rank's files written. Wait for the
    previous one first: this removes every other temporary checkpoint directory."""
    rank, world = strategy.dist.rank, strategy.dist.world_size
    root = checkpoint_root(out_dir)
    final = root / step_dir_name(step)
    # every rank must write into the same temp dir: rank 0's pid names it
    pid = int(strategy.all_reduce_max(float(os.getpid()) if rank == 0 else 0.0))
    tmp = root / f"{final.name}.tmp-{pid}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out_dir, keep=tmp)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    strategy.barrier()

    # a rank's own writes fail into its future instead of raising, so that every rank reaches the
    # barrier below and `wait` (or `poll`) decides together: a full disk often fails one rank only
    writes = [_guarded(lambda: strategy.save(tmp, ema=ema.shadow if ema is not None else None,
                                             background=background))]
    if not strategy.saves_ema:  # deepspeed: the EMA per rank beside the engine files
        writes.append(_guarded(lambda: async_write.save(
            ema.state_dict() if ema is not None else [], tmp / f"ema-rank{rank}.pt", background=background,
            host=strategy.background_host_copies() if background else None)))

    def small_files() -> Future:
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        (tmp / f"loader-rank{rank}.json").write_text(json.dumps(loader_state))
        if rank == 0:
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
        return async_write.done()

    writes.append(_guarded(small_files))
    if during_write is not None:
        during_write()
    strategy.barrier()
    trainer_state = None
    if rank == 0:
        try:
            loaders = [json.loads((tmp / f"loader-rank{r}.json").read_text()) for r in range(world)]
            trainer_state = dict(state, step=step, world_size=world, strategy=strategy.name, loader=loaders)
        except (OSError, ValueError) as e:  # a rank could not write its loader state: its future says why
            writes.append(async_write.failed(e))
    pending = PendingCheckpoint(Path(out_dir), tmp, final, rank, world, keep_last, async_write.all_of(writes))
    pending.trainer_state = trainer_state
    return pending


def _in_thread(fn, *args) -> Future:
    """`fn(*args)` in a daemon thread of its own; its result or exception in the returned future."""
    result: Future = Future()

    def run() -> None:
        try:
            result.set_result(fn(*args))
        except Exception as e:
            result.set_exception(e)

    threading.Thread(target=run, name="checkpoint-manifest", daemon=True).start()
    return result


def _guarded(write: Callable[[], Future]) -> Future:
    try:
        return write()
    except ERRORS as e:
        return async_write.failed(e)


class PendingCheckpoint:
    """A checkpoint whose files may still be in flight. Each rank's writes mark themselves done in the
    temporary directory (`.written-rank{r}`, or `.failed-rank{r}` with the error); rank 0 commits
    (trainer_state.json last, rename, `latest`, pruning) once every rank's mark is there, so a kill
    before that leaves the previous checkpoint the latest, and committing needs no collective."""

    def __init__(self, out_dir: Path, tmp: Path, final: Path, rank: int, world: int, keep_last: int,
                 writes: Future):
        self.out_dir, self.tmp, self.final = out_dir, tmp, final
        self.rank, self.world, self.keep_last = rank, world, keep_last
        self.writes = writes
        self.trainer_state: dict[str, Any] | None = None  # rank 0
        self.committed = False
        self.started = time.perf_counter()  # for the log line that says how long the write took
        self._reported_failure = False
        self._commit_error: BaseException | None = None
        self._manifest: Future | None = None  # rank 0, background saves: sizes and checksums being read
        self._marked = threading.Event()  # set after this rank's mark is on disk, not just the writes
        writes.add_done_callback(self._mark)

    def _mark(self, writes: Future) -> None:
        try:
            error = writes.exception()
            if error is None:
                (self.tmp / f"{WRITTEN}{self.rank}").touch()
            else:
                (self.tmp / f"{FAILED}{self.rank}").write_text(storage.describe(error))
        finally:
            self._marked.set()

    def _failures(self) -> list[str]:
        found = [f"rank {p.name[len(FAILED):]}: {p.read_text() or '(no room left to record its error)'}"
                 for p in sorted(self.tmp.glob(FAILED + "*"))]
        return found + ([f"rank 0 (commit): {type(self._commit_error).__name__}: {self._commit_error}"]
                        if self._commit_error is not None else [])

    def failed(self) -> bool:
        """Not collective: whether this save has failed as far as this rank can tell (rank 0: any rank's
        failure marker or its own commit; other ranks: their own writes). The loop then calls `wait` on
        every rank, which raises the same error everywhere."""
        if self.committed:
            return False
        if self.rank == 0:
            return bool(self._failures())
        return self.writes.done() and self.writes.exception() is not None

    def poll(self) -> bool:
        """Rank 0, between steps: commit if every rank's files are written. True once committed."""
        if self.rank != 0 or self.committed:
            return self.committed
        failures = self._failures()
        if failures and not self._reported_failure:
            self._reported_failure = True
            log.error("checkpoint %s could not be written (%s); the previous checkpoint stays the latest",
                      self.final.name, "; ".join(failures))
        if not failures and all((self.tmp / f"{WRITTEN}{r}").exists() for r in range(self.world)):
            # the checksums read every byte once: in a thread of their own, so the loop does not wait
            if self._manifest is None:
                self._manifest = _in_thread(checkpoint_verify.manifest, self.tmp, self._not_listed())
                futures.wait([self._manifest], timeout=MANIFEST_WAIT_S)  # a small checkpoint commits now
            if self._manifest.done():
                self._try_commit()
        return self.committed

    def wait(self, strategy) -> Path:
        """Collective: wait for this rank's writes, commit, and return the final directory; raises on
        every rank when any rank's writes failed (the temporary directory is removed): DiskFull
        (trainer.storage) when space, quota or a read-only filesystem was the cause."""
        self._marked.wait()  # this rank's writes are done and marked
        error = self.writes.exception() or (self._commit_error if self.rank == 0 else None)
        if self.rank == 0 and error is None and self._failures():
            error = RuntimeError("another rank's writes failed")
        worst = strategy.all_reduce_max(_severity(error, self._failures() if self.rank == 0 else []))
        if worst == 0 and self.rank == 0 and not self.committed:
            self._try_commit()
        if worst == 0:
            worst = strategy.all_reduce_max(_severity(self._commit_error) if self.rank == 0 else 0)
        if worst > 0:
            failures = self._failures() if self.rank == 0 else []
            strategy.barrier()
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            detail = "; ".join(failures) if failures else f"this rank: {storage.describe(error)}" if error else "see rank 0's log"
            if worst >= 2:
                raise storage.DiskFull(disk_full_message(self.out_dir, self.final.name, detail))
            raise RuntimeError(f"checkpoint {self.final.name} could not be written: {detail}")
        strategy.barrier()
        return self.final

    def _try_commit(self) -> None:
        try:
            self._commit()
        except ERRORS as e:  # reported by failed()/wait() on every rank, not raised here alone
            self._commit_error = e
            log.error("checkpoint %s could not be committed: %s: %s", self.final.name, type(e).__name__, e)

    def _not_listed(self) -> set[str]:
        return {STATE_FILE} | {f"{WRITTEN}{r}" for r in range(self.world)}

    def _commit(self) -> None:
        for marker in self.tmp.glob(WRITTEN + "*"):
            marker.unlink()
        # the state file lists every other file with its size and checksum, and is written last
        self.trainer_state["files"] = (self._manifest.result() if self._manifest is not None
                                       else checkpoint_verify.manifest(self.tmp, self._not_listed()))
        _write_atomic(self.tmp / STATE_FILE, json.dumps(self.trainer_state, indent=1))
        if self.final.exists():  # same step saved again (signal right after a periodic save)
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        root = self.final.parent
        _write_atomic(root / LATEST, self.final.name + "\n")
        for old in list_checkpoints(self.out_dir)[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True


def _severity(error: BaseException | None, failures: list[str] = ()) -> float:
    """0 = written, 1 = failed, 2 = failed for lack of space (max-reduced over the ranks)."""
    if error is None and not failures:
        return 0.0
    out_of_space = (error is not None and storage.is_out_of_space(error)) or any(
        storage.text_is_out_of_space(f) for f in failures)
    return 2.0 if out_of_space else 1.0


def recorded_bytes(ckpt_dir: Path) -> int:
    """A checkpoint's size as written (its manifest, else its files now)."""
    try:
        files = read_state(ckpt_dir).get("files") or {}
    except (OSError, ValueError):
        files = {}
    if files:
        return sum(int(f["size"]) for f in files.get("files", {}).values()) + (ckpt_dir / STATE_FILE).stat().st_size
    return storage.tree_bytes(ckpt_dir)


def disk_full_message(out_dir: Path, name: str, detail: str) -> str:
    """The one message of a checkpoint that did not fit: where, how much, what is intact, what to do."""
    root = checkpoint_root(out_dir)
    prev = find_latest(out_dir)
    if prev is None:
        need, intact = "", "No earlier checkpoint of this run exists: free space and rerun the same command (it starts over)"
    else:
        need = f"; a checkpoint of this run needs about {storage.human(recorded_bytes(prev))} (the size of {prev.name})"
        intact = (f"The previous checkpoint {prev.name} is intact and `latest` names it: free space (or lower "
                  f"run.keep_last) and rerun the same command to resume from it")
    return f"checkpoint {name} could not be written: no space in {storage.where(root)}{need}. {intact} ({detail})"


def space_shortfall(out_dir: str | Path) -> tuple[int, int, Path] | None:
    """(bytes needed, bytes free, last checkpoint) when the next checkpoint would not fit beside the
    last one (it needs as much as the last one took), else None. Not collective."""
    prev = find_latest(out_dir)
    if prev is None:
        return None
    needed, free = recorded_bytes(prev), storage.free_bytes(checkpoint_root(out_dir))
    return (needed, free, prev) if free < needed else None


def verify_checkpoint(ckpt_dir: Path, checksums: bool = True) -> list[str]:
    """What is wrong with a complete checkpoint's files (sizes always, CRC-32 with `checksums`);
    [] = verified. Checkpoints written before the manifest existed have nothing to compare."""
    try:
        state = read_state(ckpt_dir)
    except (OSError, ValueError) as e:
        return [f"{STATE_FILE}: unreadable ({type(e).__name__}: {e})"]
    return checkpoint_verify.verify(ckpt_dir, state.get("files"), checksums=checksums)


def require_verified(ckpt_dir: Path, checksums: bool = True) -> None:
    """Raise storage.CheckpointDamaged naming each bad file (and the run's other checkpoints to use
    instead) unless `ckpt_dir` verifies; for commands that read one checkpoint (export, evaluate)."""
    problems = verify_checkpoint(ckpt_dir, checksums)
    if problems:
        others = [c.name for c in list_checkpoints(Path(ckpt_dir).parent.parent) if c != Path(ckpt_dir)]
        hint = f"; other checkpoints of the run: {', '.join(others)}" if others else ""
        raise storage.CheckpointDamaged(f"checkpoint {ckpt_dir} is damaged: {'; '.join(problems)}{hint}")


def damage_report(tried: list[tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in tried)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(strategy, ckpt_dir: str | Path, *, ema, restore_rng: bool = True) -> dict[str, Any]:
    """Collective inverse of save_checkpoint, on any number of ranks and across single/ddp/fsdp.
    Returns trainer_state with `loader` = this rank's loader state and `loaders` = every rank's."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    rank, world = strategy.dist.rank, strategy.dist.world_size
    saved_world = state.get("world_size", world)
    check_resumable(ckpt_dir, state, strategy.name, world, strategy.cfg.parallel.zero_stage)
    _warn_if_global_batch_changed(state, strategy)
    ema_loaded = bool(strategy.load(ckpt_dir, ema=ema.shadow if ema is not None else None))
    # older checkpoints (and deepspeed) keep the EMA per rank; a rank the saved run did not have takes
    # rank 0's (replicas: identical on every rank) and keeps its freshly seeded RNG (its t/noise draws
    # cannot match a run that had no such rank)
    source = rank if rank < saved_world else 0
    if ema is not None and not ema_loaded:
        ema.load_state_dict(torch.load(ckpt_dir / f"ema-rank{source}.pt", weights_only=True))
    if restore_rng and rank < saved_world:
        set_rng_state(torch.load(ckpt_dir / f"rng-rank{rank}.pt", weights_only=True))
    state["loaders"] = state["loader"]  # every rank's: a loader may need streams another rank read
    state["loader"] = state["loader"][source]
    return state


def check_resumable(ckpt_dir: Path, state: dict[str, Any], strategy: str, world: int, zero_stage: int = 0) -> None:
    """Raise, before any collective load, when this run cannot read the checkpoint; the message says
    what to run instead. single/ddp/fsdp DCP checkpoints (with the EMA inside) resume each other on any
    number of ranks; deepspeed resumes deepspeed on any number of ranks and ZeRO stage (through the
    universal checkpoint, in DeepSpeedStrategy.load); deepspeed <-> the others, and fsdp checkpoints
    whose EMA is still per rank (written before the EMA moved into DCP) on another topology, do not."""
    saved_world, saved = state.get("world_size", world), state.get("strategy", strategy)
    way_on = ("export it (python -m trainer.export) and start a new run with run.init_from=<the .safetensors>: "
              "the weights carry over, the optimizer state and data position do not")
    if "deepspeed" in {saved, strategy} and saved != strategy:
        raise RuntimeError(f"{ckpt_dir} was written by strategy {saved!r}, this run uses {strategy!r}: DeepSpeed "
                           f"and torch checkpoints do not convert into each other; resume with {saved!r}, or "
                           f"{way_on}")
    if saved == "deepspeed":
        _check_zero_stage(ckpt_dir, state, zero_stage, way_on)
        return  # another world size or ZeRO stage: DeepSpeedStrategy.load converts to a universal checkpoint
    if saved in REPLICATED or (saved == "fsdp" and has_dcp_ema(ckpt_dir)):
        return  # any number of ranks, any of single/ddp/fsdp (fsdp refuses model.pt-era files itself)
    if saved_world != world or saved != strategy:
        raise RuntimeError(
            f"{ckpt_dir} was written by {saved_world} {saved} processes, this run has {world} {strategy}: it "
            f"predates the EMA in DCP and keeps it sharded per rank (ema-rank{{r}}.pt), so resume with "
            f"{saved_world} {saved} processes once (its next checkpoint reshards), or {way_on}")


def _check_zero_stage(ckpt_dir: Path, state: dict[str, Any], zero_stage: int, way_on: str) -> None:
    """The universal checkpoint moves between world sizes and between ZeRO-1 and ZeRO-2, not across the
    ZeRO-3 boundary: ZeRO-3 engines read per-rank model-state files that a ZeRO-1/2 conversion does not
    have (and the other way round)."""
    saved = saved_zero_stage(state, zero_stage)
    if (saved == 3) != (zero_stage == 3):
        raise RuntimeError(
            f"{ckpt_dir} is a DeepSpeed ZeRO-{saved} checkpoint, this run is ZeRO-{zero_stage}: DeepSpeed's "
            f"universal checkpoint converts between world sizes and between ZeRO-1 and ZeRO-2, but not across "
            f"ZeRO-3 (its model-state files differ). Resume with parallel.zero_stage={saved} (any number of "
            f"processes), or {way_on}")


def saved_zero_stage(state: dict[str, Any], default: int) -> int:
    """parallel.zero_stage of the run that wrote a trainer_state (its resolved config)."""
    return int(((state.get("config") or {}).get("parallel") or {}).get("zero_stage", default))


def has_dcp_ema(ckpt_dir: Path) -> bool:
    from trainer.strategies import dcp_state

    return dcp_state.has_dcp(ckpt_dir) and dcp_state.has_ema(ckpt_dir)


def _warn_if_global_batch_changed(state: dict[str, Any], strategy) -> None:
    """A changed global batch is allowed (the loader keeps the data position in samples); say so."""
    loaders = state.get("loader") or []
    old = (loaders[0] or {}).get("global_batch") if loaders else None
    data, optim = strategy.cfg.data, strategy.cfg.optim
    new = data.batch_size * strategy.dist.world_size * optim.grad_accum
    if old is not None and int(old) != new and strategy.dist.rank == 0:
        log.warning("[resume] global batch size changed from %s to %s (data.batch_size x world size x "
                    "optim.grad_accum); the data position is kept in samples", old, new)
