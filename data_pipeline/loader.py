"""Training-side loader: webdataset tar shards → batches for the diffusion trainer, resumable exactly.

    loader = build_loader(cfg.data, rank=rank, world_size=world_size)          # infinite, shuffled
    for batch in loader: ...  # video [B,C,T+K,H,W] in [-1,1], text_emb [B,L,D], text_mask [B,L], ...
    ckpt["data"] = loader.state_dict()                                          # small, JSON-able
    loader.load_state_dict(ckpt["data"])                                        # before iterating

How it stays exact (docs/loader.md has the long version):
- Every stream (one per rank x DataLoader worker) follows a *plan* (data_pipeline.plan): its sample
  order per epoch is a pure function of seed, epoch, rank and worker, computed from index.json counts.
- Each worker builds whole batches, tagged with its position (epoch, offset in the plan, batches
  made). torch's DataLoader hands batches out round-robin over workers, in order, so batch n of a
  rank comes from worker n % W. The loader records the tag of each batch *as the caller receives
  it*, so prefetched-but-unconsumed batches never count.
- On resume, worker i of the fresh DataLoader plays logical worker (i + n) % W, and each stream
  restarts at its recorded offset: shards whose planned samples were all delivered are not
  opened, skipped samples are read but not decoded.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.decode import BadSample, Sample, decode_sample
from data_pipeline.index import ShardIndex, check_matches, open_binary, read_index
from data_pipeline.lifetime import exit_when_process_exits
from data_pipeline.plan import (
    SALT_TRAIN_IMAGE_FRAMES,
    SALT_VAL_IMAGE_FRAMES,
    Plan,
    check_enough_samples,
    num_streams,
    seed_words,
    train_plan,
    val_plan,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1


# ----------------------------------------------------------------------------------- shard reading


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples (suffix → bytes) of one tar, in tar order, via webdataset's tar iterators.

    A read error ends the shard with an error log naming it; the samples not read count as missing.
    """
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        log.error("shard %s: read error, rest of the shard skipped: %s", url, exn)
        return False  # stop this shard

    try:
        stream = open_binary(url)
    except OSError as e:
        log.error("shard %s: cannot open (%s); its samples are skipped", url, e)
        return
    with stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)


def follow_plan(index: ShardIndex, plan: Plan, start: int = 0) -> Iterator[tuple[int, dict | None]]:
    """(output position, raw sample or None when missing) for plan positions start, start+1, ...

    Holds read-but-not-yet-due samples in memory; the plan's buffer locality bounds them.
    """
    n = len(plan)
    if start >= n:
        return
    order = plan.order
    needed = np.zeros(n, dtype=bool)
    needed[order[start:]] = True
    pending: dict[int, dict] = {}  # read position → raw sample, read but not yet due
    missing: set[int] = set()  # read positions that turned out unreadable
    ptr = start

    def due():
        """Deliver, in plan order, everything that is now available (or known to be missing)."""
        nonlocal ptr
        while ptr < n and (int(order[ptr]) in pending or int(order[ptr]) in missing):
            r_out = int(order[ptr])
            missing.discard(r_out)
            yield ptr, pending.pop(r_out, None)
            ptr += 1

    base = 0
    for seg in plan.segments:
        r0, r1 = base, base + seg.size
        base = r1
        if not needed[r0:r1].any():
            continue  # every planned sample of this segment was already delivered: don't open it
        entry = index.shards[seg.shard]
        seen = seg.start
        for j, raw in enumerate(read_shard(entry.url)):
            if j < seg.start:
                continue  # before this stream's range (or already delivered): read past, never decoded
            if j >= seg.stop:
                break
            seen = j + 1
            if needed[r0 + j - seg.start]:
                pending[r0 + j - seg.start] = raw
                yield from due()
        if seen < seg.stop:
            lost = [r for r in range(r0 + seen - seg.start, r1) if needed[r]]
            log.error("shard %s: index.json says %d samples, only %d readable; %d planned samples skipped",
                      entry.url, entry.count, seen, len(lost))
            missing.update(lost)
            yield from due()


# ------------------------------------------------------------------------------------- batching


@dataclass
class StreamPos:
    """Where one logical worker stream is: plan offset within epoch, batches made, samples skipped."""

    epoch: int = 0
    offset: int = 0
    batches: int = 0
    skipped: int = 0  # bad or missing samples passed over (each also logged with its reason)


def image_frames_from_other_clips(samples: list[Sample], extra: list[Sample], k: int,
                                  rng: np.random.Generator) -> np.ndarray:
    """[B, K, H, W, 3]: per sample, K random frames of random *other* clips (paper 4.3.1).

    Sources are the batch's other clips plus `extra` (a neighbouring clip of the stream when the
    batch has one sample). Only with a single clip in sight do we fall back to the clip's own
    frames (logged), so shapes never change.
    """
    pool = samples + [e for e in extra if e is not None]
    out = np.empty((len(samples), k) + samples[0].frames.shape[1:], dtype=np.uint8)
    for i, s in enumerate(samples):
        others = [c for c in pool if c.key != s.key] or [s]
        if len(others) == 1 and others[0] is s:
            log.warning("joint image frames: no other clip available for %s; using its own frames", s.key)
        for m in range(k):
            src = others[int(rng.integers(len(others)))]
            out[i, m] = src.frames[int(rng.integers(src.frames.shape[0]))]
    return out


def to_unit_range(video: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] → float32 [B, 3, F, H, W] = x / 127.5 - 1.

    In numpy on a contiguous uint8 copy: about 10x faster than permuting and converting in torch,
    whose intra-op threads fight the trainer for cores, and bit-identical.
    """
    x = np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))
    out = np.empty(x.shape, dtype=np.float32)
    np.divide(x, np.float32(127.5), out=out)
    out -= np.float32(1.0)
    return torch.from_numpy(out)


def collate(samples: list[Sample], image_frames: np.ndarray | None, num_frames: int) -> dict:
    video = np.stack([s.frames for s in samples])  # [B, T, H, W, 3] uint8
    if image_frames is not None and image_frames.shape[1] > 0:
        video = np.concatenate([video, image_frames], axis=1)
    length = max([1] + [s.text_emb.shape[0] for s in samples])
    dim = samples[0].text_emb.shape[1]
    emb = np.zeros((len(samples), length, dim), dtype=np.float32)
    mask = np.zeros((len(samples), length), dtype=bool)
    for i, s in enumerate(samples):
        n = s.text_emb.shape[0]
        emb[i, :n] = s.text_emb
        mask[i, :n] = True
    return {
        "video": to_unit_range(video),
        "text_emb": torch.from_numpy(emb),
        "text_mask": torch.from_numpy(mask),
        "num_video_frames": num_frames,
        "keys": [s.key for s in samples],
        "captions": [s.caption for s in samples],
    }


# ------------------------------------------------------------------------------------ the stream


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs (pickled to spawn/forkserver workers: plain values only)."""

    index: ShardIndex
    train: bool
    rank: int
    world_size: int
    workers: int  # logical streams per rank = max(1, num_workers)
    batch_size: int
    num_frames: int
    image_frames: int
    height: int
    width: int
    max_text_len: int
    shuffle_buffer: int
    seed: int


class ShardStream(IterableDataset):
    """One rank's batches; inside DataLoader worker i it plays logical worker (i + rotation) % W."""

    def __init__(self, spec: StreamSpec, positions: list[StreamPos], rotation: int = 0):
        self.spec = spec
        self.positions = positions
        self.rotation = rotation

    # -- helpers
    def _decode(self, raw: dict | None) -> Sample | None:
        if raw is None:
            return None
        sp = self.spec
        try:
            return decode_sample(raw, frames=sp.num_frames, height=sp.height, width=sp.width,
                                 max_text_len=sp.max_text_len, text_dim=sp.index.encoder_dim)
        except BadSample as e:
            log.error("bad sample %s in %s skipped: %s", raw.get("__key__"), raw.get("__url__"), e)
            return None
        except Exception as e:  # anything else a hostile file can provoke: skip it, keep training
            log.error("bad sample %s in %s skipped: %s: %s", raw.get("__key__"), raw.get("__url__"),
                      type(e).__name__, e)
            return None

    def _logical_worker(self) -> int:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return (physical + self.rotation) % self.spec.workers

    def __iter__(self):
        worker = self._logical_worker()
        return self._train_batches(worker) if self.spec.train else self._val_batches(worker)

    # -- train: infinite, shuffled, resumable
    def _train_samples(self, stream: int, pos: StreamPos) -> Iterator[tuple[int, int, Sample | None]]:
        sp = self.spec
        n_streams = sp.world_size * sp.workers
        epoch, offset = pos.epoch, pos.offset
        while True:
            plan = train_plan(sp.index.counts, seed=sp.seed, epoch=epoch, stream=stream, n_streams=n_streams,
                              buffer=sp.shuffle_buffer)
            good = 0
            for p, raw in follow_plan(sp.index, plan, offset):
                sample = self._decode(raw)
                good += sample is not None
                yield epoch, p + 1, sample
            if good == 0 and offset == 0 and len(plan) > 0:
                raise RuntimeError(f"loader stream {stream}: no readable sample in epoch {epoch} of {sp.index.source}")
            epoch, offset = epoch + 1, 0

    def _train_batches(self, worker: int) -> Iterator[dict]:
        sp = self.spec
        stream = sp.rank * sp.workers + worker
        pos = self.positions[worker]
        it = self._train_samples(stream, pos)
        ahead: list[tuple[int, int, Sample | None]] = []  # looked-ahead items (B == 1 joint frames)

        def take():
            return ahead.pop(0) if ahead else next(it)

        batches, skipped = pos.batches, pos.skipped
        while True:
            samples: list[Sample] = []
            epoch = offset = 0
            while len(samples) < sp.batch_size:
                epoch, offset, sample = take()
                if sample is None:
                    skipped += 1
                else:
                    samples.append(sample)

            def next_good_clip() -> list[Sample]:  # the stream's next good clip (not consumed, decoded once)
                while not ahead or ahead[-1][2] is None:
                    ahead.append(next(it))
                return [ahead[-1][2]]

            images = self._image_frames(samples, next_good_clip, stream, batches, SALT_TRAIN_IMAGE_FRAMES)
            batch = collate(samples, images, sp.num_frames)
            batches += 1
            batch["_pos"] = [worker, epoch, offset, batches, skipped]
            yield batch

    def _image_frames(self, samples: list[Sample], borrow: Callable[[], list[Sample]],
                      *rng_key: int) -> np.ndarray | None:
        """The batch's data.num_image_frames independent image frames (joint training, paper 4.3.1),
        or None when there are none. A batch of one clip has no other clip to take frames from, so
        it borrows one from `borrow()` (called only then); `rng_key` (ending in a salt) seeds the draw."""
        sp = self.spec
        if sp.image_frames <= 0:
            return None
        extra = borrow() if len(samples) == 1 else []
        rng = np.random.default_rng(seed_words(sp.seed, *rng_key))
        return image_frames_from_other_clips(samples, extra, sp.image_frames, rng)

    # -- validation: finite, in order; batch j is made by logical worker j % W
    def _val_batches(self, worker: int) -> Iterator[dict]:
        sp = self.spec
        plan = val_plan(sp.index.counts, rank=sp.rank, world_size=sp.world_size)
        items = follow_plan(sp.index, plan, 0)
        previous: Sample | None = None
        ahead: list[tuple[int, dict | None]] = []
        n_batches = -(-len(plan) // sp.batch_size)

        def take():
            return ahead.pop(0) if ahead else next(items, None)

        for j in range(n_batches):
            mine = j % sp.workers == worker
            size = min(sp.batch_size, len(plan) - j * sp.batch_size)
            samples = []
            for _ in range(size):
                item = take()
                if item is not None and mine:
                    sample = self._decode(item[1])
                    if sample is not None:
                        samples.append(sample)
            if not mine:
                continue
            if not samples:
                log.error("validation batch %d of rank %d has no readable sample; skipped", j, sp.rank)
                continue

            def next_or_previous_clip(previous: Sample | None = previous) -> list[Sample]:
                """The next clip (left unconsumed), else the previous one."""
                nxt = take()
                if nxt is not None:
                    ahead.append(nxt)
                candidates = [self._decode(nxt[1]) if nxt is not None else None, previous]
                return [c for c in candidates if c is not None][:1]

            images = self._image_frames(samples, next_or_previous_clip, sp.rank, j, SALT_VAL_IMAGE_FRAMES)
            previous = samples[-1]
            batch = collate(samples, images, sp.num_frames)
            batch["_pos"] = [worker, 0, (j + 1) * sp.batch_size, j + 1, 0]
            yield batch


def worker_context(method: str) -> multiprocessing.context.BaseContext:
    """Start method for loader workers; a forkserver preloads this module (torch, numpy) once.

    Without the preload every worker of every new iterator imports torch again (seconds each);
    with it, workers fork from a small server process that never held PyAV/FFmpeg state.
    """
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # only takes effect before the server first starts
    return ctx


def _worker_init(trainer_pid: int, worker_id: int) -> None:
    """Each loader worker ends when the trainer does, even after a kill -9 (see data_pipeline.lifetime)."""
    exit_when_process_exits(trainer_pid)


def _passthrough(batch):
    """DataLoader collate_fn for ready-made batches (module level so spawn workers can pickle it)."""
    return batch


# ------------------------------------------------------------------------------------ the loader


class VideoTextLoader:
    """Iterable of batches for one rank, with `state_dict`/`load_state_dict` for exact resumption.

    Each `iter()` of a train loader continues from the consumed position (a new iterator after a
    restore starts where the state says). A newer `iter()` or a `load_state_dict()` ends older
    iterators (they stop), so a stale iterator can never move the saved position. A validation
    loader restarts its finite, ordered pass at every `iter()`.
    """

    def __init__(self, spec: StreamSpec, *, num_workers: int, prefetch_factor: int, start_method: str):
        self.spec = spec
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.start_method = start_method
        self.consumed = 0  # batches handed to the caller on this rank (train)
        self.positions = [StreamPos() for _ in range(spec.workers)]
        self._generation = 0

    @property
    def index(self) -> ShardIndex:
        return self.spec.index

    @property
    def text_dim(self) -> int:
        return self.spec.index.encoder_dim

    @property
    def skipped_samples(self) -> int:
        """Bad or missing samples this rank's train streams passed over so far (for monitoring)."""
        return sum(p.skipped for p in self.positions)

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's streams is still in."""
        return min(p.epoch for p in self.positions)

    def __len__(self) -> int:
        """Batches per validation pass on this rank (train loaders are infinite)."""
        if self.spec.train:
            raise TypeError("a train loader is infinite and has no len()")
        n = len(val_plan(self.spec.index.counts, rank=self.spec.rank, world_size=self.spec.world_size))
        return -(-n // self.spec.batch_size)

    def _dataloader(self, dataset: ShardStream) -> DataLoader:
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": worker_context(self.start_method),
                      "worker_init_fn": functools.partial(_worker_init, os.getpid()),
                      "pin_memory": torch.cuda.is_available()}  # page-locked batches for non_blocking copies
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                          **kwargs)

    def __iter__(self) -> Iterator[dict]:
        if not self.spec.train:
            for batch in self._dataloader(ShardStream(self.spec, [StreamPos() for _ in self.positions])):
                batch.pop("_pos", None)
                yield batch
            return
        self._generation += 1  # a newer iter() or load_state_dict() ends this iterator (no stale updates)
        generation = self._generation
        positions = [StreamPos(p.epoch, p.offset, p.batches, p.skipped) for p in self.positions]
        dataset = ShardStream(self.spec, positions, rotation=self.consumed % self.spec.workers)
        for batch in self._dataloader(dataset):
            if generation != self._generation:
                return
            worker, *position = batch.pop("_pos")
            self.positions[worker] = StreamPos(*position)
            self.consumed += 1
            yield batch

    # -- resumption
    def state_dict(self) -> dict:
        sp = self.spec
        return {
            "version": STATE_VERSION,
            "train": sp.train,
            "rank": sp.rank,
            "world_size": sp.world_size,
            "workers": sp.workers,
            "seed": sp.seed,
            "batch_size": sp.batch_size,
            "shuffle_buffer": sp.shuffle_buffer,
            "dataset": sp.index.fingerprint(),
            "batches": self.consumed,
            "streams": [[p.epoch, p.offset, p.batches, p.skipped] for p in self.positions],
        }

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        """Restore a position saved by state_dict(); call before iterating.

        The stream layout depends on world_size, num_workers, seed and shuffle_buffer; with any of
        them changed an exact resume is impossible: strict=True refuses (naming the field and both
        values), strict=False warns and restarts every stream at the start of the oldest saved epoch
        (no sample of that epoch is skipped; some are seen twice).
        """
        sp = self.spec
        self._generation += 1
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: unsupported version {state.get('version') if isinstance(state, dict) else state!r}")
        if bool(state.get("train")) != sp.train:
            raise ValueError(f"loader state: saved from a {'train' if state.get('train') else 'validation'} loader")
        if not sp.train:
            return
        checks = [("world_size", sp.world_size, "world size"), ("rank", sp.rank, "rank"),
                  ("workers", sp.workers, "data.num_workers (0 counts as 1)"), ("seed", sp.seed, "data.seed"),
                  ("shuffle_buffer", sp.shuffle_buffer, "data.shuffle_buffer")]
        for key, have, what in checks:
            if state.get(key) != have:
                oldest = min(int(s[0]) for s in state["streams"])
                msg = (f"loader state: {key} was {state.get(key)} when saved, this run has {what} = {have}; "
                       "an exact data resume needs the same value")
                if strict:
                    raise ValueError(msg + f" (or load with strict=False to restart at epoch {oldest})")
                log.warning("%s; restarting all streams at the start of epoch %d", msg, oldest)
                self.positions = [StreamPos(oldest, 0, 0) for _ in range(sp.workers)]
                self.consumed = 0
                return
        if state.get("batch_size") != sp.batch_size:
            log.warning("loader state: batch_size %s → %s; resuming at the same sample positions",
                        state.get("batch_size"), sp.batch_size)
        if state.get("dataset") != sp.index.fingerprint():
            log.warning("loader state: the shards in %s changed since the state was saved; resuming at the saved "
                        "epochs/offsets, but the sample order differs", sp.index.source)
        try:
            positions = [StreamPos(*(int(v) for v in entry)) for entry in state["streams"]]
            consumed = int(state["batches"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"loader state: malformed streams/batches ({e})") from None
        if len(positions) != sp.workers or consumed < 0 or any(p.epoch < 0 or p.offset < 0 for p in positions):
            raise ValueError(f"loader state: {len(positions)} stream positions for {sp.workers} workers, or negative "
                             "values")
        self.positions, self.consumed = positions, consumed


# ------------------------------------------------------------------------------------ entry point


def build_loader(cfg, *, rank: int = 0, world_size: int = 1, shards: str | os.PathLike | None = None,
                 train: bool = True) -> VideoTextLoader:
    """Loader over `shards` (default: cfg.shards for train, cfg.val_shards or cfg.shards otherwise).

    Raises ShardIndexError (a ValueError naming the field and both values) for a missing or
    mismatched index.json, or shard files it lists that are missing.
    """
    if shards is None:
        shards = cfg.shards if train else (cfg.val_shards or cfg.shards)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    index = read_index(os.fspath(shards))
    check_matches(index, encoder=cfg.encoder, frames=cfg.num_frames, height=cfg.image_size, width=cfg.image_size)
    workers = max(1, cfg.num_workers)
    if train:
        check_enough_samples(index.counts, num_streams(world_size, cfg.num_workers), index.source)
    spec = StreamSpec(
        index=index, train=train, rank=rank, world_size=world_size, workers=workers, batch_size=cfg.batch_size,
        num_frames=cfg.num_frames, image_frames=cfg.num_image_frames, height=cfg.image_size, width=cfg.image_size,
        max_text_len=cfg.max_text_len, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
    )
    return VideoTextLoader(spec, num_workers=cfg.num_workers, prefetch_factor=getattr(cfg, "prefetch_factor", 2),
                           start_method=getattr(cfg, "worker_start_method", "forkserver"))
