"""Training-side loader: webdataset tar shards → batches for the diffusion trainer, resumable exactly.

    loader = build_loader(cfg.data, rank=rank, world_size=world_size, grad_accum=A)   # infinite, shuffled
    for batch in loader: ...  # video [B,C,T+K,H,W] in [-1,1], text_emb [B,L,D], text_mask [B,L], keys, ...
    ckpt["data"] = loader.state_dict()                                          # small, JSON-able
    loader.load_state_dict(ckpt["data"])        # or the list of every rank's states (another world size)

Elastic determinism (docs/loader.md has the long version): the *global* sequence of training samples
depends only on the dataset, data.seed, the epoch and the number of canonical streams C (data.streams,
default the global batch size G = batch_size x world_size x grad_accum), never on the number of ranks
or loader workers:
- Each canonical stream follows a *plan* (data_pipeline.plan): its sample order per epoch is a pure
  function of (seed, epoch, stream, C), computed from index.json counts.
- Global step S takes G consecutive global positions; position p is the next sample of stream p mod C.
  Rank r takes slice r of each global batch; C being a multiple of G, every stream is read by one rank
  only, and within the rank by one worker (streams dealt round-robin over the workers).
- Each worker yields, per micro-batch, the rows of its own streams; torch's DataLoader hands worker
  outputs out round-robin and in order, so the loader assembles micro-batch n from outputs n*W ..
  n*W+W-1 and records the stream positions *as the caller receives the batch* (prefetched parts never
  count).
- Joint image frames of a row come from the next K clips of the row's own stream, so they too are the
  same whatever the number of ranks or workers.
- The state is kept per stream and in global samples, so a run resumes on another number of ranks or
  workers (given every rank's saved state) at the next global sample.
"""
from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import multiprocessing.context
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.global_motion import MOTION_DIMS, MOTION_FIELD
from data_pipeline.decode import BadSample, Sample, decode_sample
from data_pipeline.index import ShardEntry, ShardIndex, check_matches, read_index
from data_pipeline.lifetime import exit_when_process_exits
from data_pipeline.loader_config import DataConfig, DownloadConfig
from data_pipeline.plan import (
    SALT_TRAIN_IMAGE_FRAMES,
    SALT_VAL_IMAGE_FRAMES,
    Plan,
    Segment,
    check_enough_samples,
    epoch_sizes,
    seed_words,
    train_plan,
    val_plan,
)
from data_pipeline.remote import ShardUnavailable, open_source

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: positions per (rank, worker) stream, before elastic determinism


# ----------------------------------------------------------------------------------- shard reading


def tar_samples(url: str, stream) -> Iterator[dict]:
    """Raw samples (suffix → bytes) of an open tar, in tar order, via webdataset's tar iterators.

    A read error ends the shard with an error log naming it; the samples not read count as missing.
    """
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        log.error("shard %s: read error, rest of the shard skipped: %s", url, exn)
        return False  # stop this shard

    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    yield from wds.tariterators.group_by_keys(files, handler=handler)


def unavailable(e: OSError) -> str:
    """Why a shard could not be opened, for the log line that names it."""
    if isinstance(e, ShardUnavailable):
        return f"{e.reason} after {e.attempts} attempt(s)" + (f": {e.detail}" if e.detail else "")
    return f"{type(e).__name__}: {e}"


def read_shard(url: str, download: DownloadConfig | None = None) -> Iterator[dict]:
    """Raw samples of one shard (local, URL or pipe:, downloaded with retries); a shard that cannot
    be opened is logged and yields nothing."""
    try:
        stream = open_source(url, download or DownloadConfig())
    except OSError as e:
        log.error("shard %s: cannot open (%s); its samples are skipped", url, unavailable(e))
        return
    with stream:
        yield from tar_samples(url, stream)


class _InPlanOrder:
    """Samples arrive in shard (read) order; hands them out in plan order from `start` on, each as
    soon as every earlier planned position is in. A missing sample is put in as None."""

    def __init__(self, order: np.ndarray, start: int):
        self.order, self.ptr = order, start
        self.ready: dict[int, dict | None] = {}  # read position → raw sample (None: missing), not yet due

    def put(self, read_pos: int, raw: dict | None) -> Iterator[tuple[int, dict | None]]:
        """Add one read position, then deliver everything that is now due."""
        self.ready[read_pos] = raw
        while self.ptr < len(self.order) and int(self.order[self.ptr]) in self.ready:
            yield self.ptr, self.ready.pop(int(self.order[self.ptr]))
            self.ptr += 1


def _read_segment(entry: ShardEntry, seg: Segment, first: int, needed: np.ndarray, download: DownloadConfig,
                  lost: list[str] | None) -> Iterator[tuple[int, dict | None]]:
    """(read position, raw sample or None when missing) for the needed positions of one plan segment,
    whose first read position is `first`. A shard that cannot be opened is logged and appended to
    `lost`; samples the shard holds fewer of than index.json says are logged; both come out as None."""
    positions = range(first, first + seg.size)
    try:
        stream = open_source(entry.url, download)
    except OSError as e:
        planned = [r for r in positions if needed[r]]
        log.error("shard %s unavailable (%s); its %d planned samples are skipped", entry.url, unavailable(e),
                  len(planned))
        if lost is not None:
            lost.append(entry.url)
        yield from ((r, None) for r in planned)
        return
    seen = seg.start
    with stream:
        for j, raw in enumerate(tar_samples(entry.url, stream)):
            if j < seg.start:
                continue  # before this stream's range (or already delivered): read past, never decoded
            if j >= seg.stop:
                break
            seen = j + 1
            if needed[first + j - seg.start]:
                yield first + j - seg.start, raw
    if seen < seg.stop:
        unread = [r for r in range(first + seen - seg.start, first + seg.size) if needed[r]]
        log.error("shard %s: index.json says %d samples, only %d readable; %d planned samples skipped",
                  entry.url, entry.count, seen, len(unread))
        yield from ((r, None) for r in unread)


def follow_plan(index: ShardIndex, plan: Plan, start: int = 0, download: DownloadConfig | None = None,
                lost: list[str] | None = None) -> Iterator[tuple[int, dict | None]]:
    """(output position, raw sample or None when missing) for plan positions start, start+1, ...

    Holds read-but-not-yet-due samples in memory; the plan's buffer locality bounds them. A shard
    that cannot be opened (every download try failed) is logged, appended to `lost`, and its planned
    samples are missing (the caller replaces them like bad samples).
    """
    download = download or DownloadConfig()
    n = len(plan)
    if start >= n:
        return
    needed = np.zeros(n, dtype=bool)
    needed[plan.order[start:]] = True
    in_order = _InPlanOrder(plan.order, start)
    first = 0
    for seg in plan.segments:
        if needed[first:first + seg.size].any():  # else every planned sample of it was delivered: not opened
            for r, raw in _read_segment(index.shards[seg.shard], seg, first, needed, download, lost):
                yield from in_order.put(r, raw)
        first += seg.size


# ------------------------------------------------------------------------------------- batching


@dataclass
class StreamPos:
    """Where one stream is: epoch, plan offset within it, samples delivered (train: good samples handed
    out by a canonical stream; validation: batches made), bad or missing samples passed over."""

    epoch: int = 0
    offset: int = 0
    delivered: int = 0
    skipped: int = 0  # bad or missing samples passed over (each also logged with its reason)
    filtered: int = 0  # good samples passed over on purpose: motion score below data.min_motion
    lost_shards: int = 0  # shards given up after every download try (their samples are in `skipped`)


def image_frames_from_other_clips(samples: list[Sample], extra: list[Sample], k: int,
                                  rng: np.random.Generator) -> np.ndarray:
    """[B, K, H, W, 3]: per sample, K random frames of random *other* clips (paper 4.3.1).

    Validation batches only (training takes them from the row's own stream, see TrainStream).
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


def stored_motion(metas: list[dict]) -> torch.Tensor:
    """[B, 4] float32: each clip's global motion as data_pipeline.shard stored it in its {key}.json
    (common.global_motion on the full decoded frame), NaN rows for clips of shards made before
    it was stored (model.conditioning measures those on the fly)."""
    out = np.full((len(metas), MOTION_DIMS), np.nan, dtype=np.float32)
    for i, meta in enumerate(metas):
        value = meta.get(MOTION_FIELD)
        if value is not None and len(value) == MOTION_DIMS:
            out[i] = value
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
        MOTION_FIELD: stored_motion([s.meta for s in samples]),
    }


# ------------------------------------------------------------------------------------ validation stream


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs (pickled to spawn/forkserver workers: plain values only)."""

    index: ShardIndex
    train: bool
    rank: int
    world_size: int
    workers: int  # validation: logical workers per rank = max(1, num_workers)
    batch_size: int
    num_frames: int
    image_frames: int
    height: int
    width: int
    max_text_len: int
    shuffle_buffer: int
    seed: int
    grad_accum: int = 1  # micro-batches per optimizer step (train: part of the global batch size)
    streams: int = 0  # train: canonical streams C (resolved, a multiple of the global batch size)
    min_motion: float = 0.0  # data.min_motion: skip samples whose stored motion score is lower
    download: DownloadConfig = field(default_factory=DownloadConfig)  # remote shards: tries, backoff, timeouts

    def too_static(self, raw: dict) -> bool:
        """True when the sample's stored motion score is below data.min_motion (reads only its JSON,
        never the video). Samples without a score (shards made before it existed) are kept."""
        if not self.min_motion or "json" not in raw:
            return False
        try:
            score = json.loads(raw["json"]).get("motion")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return False  # decode_sample reports the broken JSON as a bad sample
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return False
        if score < self.min_motion:
            log.debug("sample %s in %s: motion %.4f < data.min_motion=%g, skipped", raw.get("__key__"),
                      raw.get("__url__"), score, self.min_motion)
            return True
        return False

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum


def decode_or_log(spec: StreamSpec, raw: dict | None) -> Sample | None:
    """The decoded sample, or None (logged at ERROR with key, shard and reason) when it is missing or bad."""
    if raw is None:
        return None
    try:
        return decode_sample(raw, frames=spec.num_frames, height=spec.height, width=spec.width,
                             max_text_len=spec.max_text_len, text_dim=spec.index.encoder_dim)
    except BadSample as e:
        log.error("bad sample %s in %s skipped: %s", raw.get("__key__"), raw.get("__url__"), e)
        return None
    except Exception as e:  # anything else a hostile file can provoke: skip it, keep training
        log.error("bad sample %s in %s skipped: %s: %s", raw.get("__key__"), raw.get("__url__"),
                  type(e).__name__, e)
        return None


class ShardStream(IterableDataset):
    """Validation batches of one rank; inside DataLoader worker i it makes batches j with j % W == i."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def _decode(self, raw: dict | None) -> Sample | None:
        if raw is not None and self.spec.too_static(raw):
            return None  # data.min_motion: left out of validation too (logged at DEBUG)
        return decode_or_log(self.spec, raw)

    def __iter__(self):
        info = get_worker_info()
        return self._val_batches(info.id if info is not None else 0)

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
        items = follow_plan(sp.index, plan, 0, sp.download)
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
            yield collate(samples, images, sp.num_frames)


# ------------------------------------------------------------------------------ train: the global plan


@dataclass(frozen=True)
class Layout:
    """How the global sample sequence maps onto this rank's micro-batches (docs/loader.md).

    The global sequence: C canonical streams (`data.streams`, default the global batch size G =
    batch_size x world_size x grad_accum), each an infinite sequence of samples that depends only on
    (dataset, seed, epoch, C). Global step S takes the G samples at global positions [S*G, (S+1)*G);
    position p comes from stream p mod C (its next sample). Slot `slot` of a step (0 <= slot < G) is
    row `slot % batch_size` of micro-batch `(slot // batch_size) % grad_accum` of rank
    `slot // (batch_size * grad_accum)`. C is a multiple of G, so stream (S mod C/G) * G + slot
    always lands on the same rank: each stream is read by exactly one rank and one of its workers.
    """

    global_batch: int
    streams: int
    rank: int
    batch_size: int
    grad_accum: int

    @property
    def per_rank(self) -> int:
        return self.batch_size * self.grad_accum

    def rank_streams(self) -> list[int]:
        """The streams this rank reads, in the order they are first used."""
        k = self.streams // self.global_batch
        first = self.rank * self.per_rank
        return [t * self.global_batch + first + j for t in range(k) for j in range(self.per_rank)]

    def micro_streams(self, step: int, micro: int) -> list[int]:
        """Stream of each row of this rank's micro-batch `micro` of global step `step`."""
        base = (step % (self.streams // self.global_batch)) * self.global_batch
        first = self.rank * self.per_rank + micro * self.batch_size
        return [base + first + i for i in range(self.batch_size)]


def resolve_streams(streams: int, global_batch: int) -> int:
    """data.streams (0 = the global batch size), checked to be a positive multiple of it."""
    c = streams or global_batch
    if c < 1 or c % global_batch:
        raise ValueError(f"data.streams={streams} must be a multiple of the global batch size {global_batch} "
                         "(data.batch_size x world size x optim.grad_accum), or 0 for the global batch size itself")
    return c


@dataclass
class _Item:
    """A good sample of a stream with the stream's position just after it."""

    sample: Sample
    epoch: int
    offset: int
    skipped: int
    filtered: int = 0
    lost_shards: int = 0


class TrainStream(IterableDataset):
    """Inside (logical) loader worker w: the streams of this rank with index j % W == w. For every
    micro-batch n = start, start+1, ... it yields one *part*: the rows whose streams it owns (maybe
    none). torch's DataLoader returns worker outputs round-robin and in order, so parts n*W .. n*W+W-1
    of the output are micro-batch n; the loader assembles them."""

    def __init__(self, spec: StreamSpec, layout: Layout, positions: dict[int, StreamPos], start_step: int,
                 start_micro: int, workers: int):
        self.spec, self.layout, self.positions = spec, layout, positions
        self.start_step, self.start_micro, self.workers = start_step, start_micro, workers

    def _decode(self, raw: dict | None) -> Sample | None:
        return decode_or_log(self.spec, raw)

    def _stream_items(self, stream: int, pos: StreamPos) -> Iterator[_Item]:
        """The stream's good samples from `pos` on, epoch after epoch (bad ones counted and passed over)."""
        sp = self.spec
        epoch, offset, skipped, filtered = pos.epoch, pos.offset, pos.skipped, pos.filtered
        lost: list[str] = []  # shards of this stream given up since `pos` (follow_plan appends)
        while True:
            plan = train_plan(sp.index.counts, seed=sp.seed, epoch=epoch, stream=stream,
                              n_streams=self.layout.streams, buffer=sp.shuffle_buffer)
            good = static = 0
            lost_before = len(lost)
            for p, raw in follow_plan(sp.index, plan, offset, sp.download, lost):
                if raw is not None and sp.too_static(raw):  # like a bad sample: the stream's next one replaces it
                    filtered += 1
                    static += 1
                    continue
                sample = self._decode(raw)
                if sample is None:
                    skipped += 1
                    continue
                good += 1
                yield _Item(sample, epoch, p + 1, skipped, filtered, pos.lost_shards + len(lost))
            if good == 0 and offset == 0:
                why = f" ({static} below data.min_motion={sp.min_motion:g})" if static else ""
                if len(lost) > lost_before:
                    why += f" (shards unavailable: {', '.join(lost[lost_before:][:5])})"
                raise RuntimeError(f"loader stream {stream}: no readable sample in epoch {epoch} of "
                                   f"{sp.index.source}{why}")
            epoch, offset = epoch + 1, 0

    def _image_sources(self, sample: Sample, window: deque[_Item], items: Iterator[_Item]) -> list[Sample]:
        """The K clips a row's image frames come from: the next K clips of its stream that are not the
        clip itself (decoded once: they are the stream's next rows). The window looks ahead at most
        2K + 2 clips; a stream whose epochs hold only this clip falls back to its own frames (logged)."""
        k = self.spec.image_frames
        if k <= 0:
            return []
        while sum(it.sample.key != sample.key for it in window) < k and len(window) < 2 * k + 2:
            window.append(next(items))
        others = [it.sample for it in window if it.sample.key != sample.key][:k]
        if len(others) < k:
            log.warning("joint image frames: no other clip near %s in its stream; using its own frames", sample.key)
            others += [sample] * (k - len(others))
        return others

    def __iter__(self) -> Iterator[dict]:
        sp, lay = self.spec, self.layout
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine = [c for j, c in enumerate(lay.rank_streams()) if j % self.workers == worker]
        items = {c: self._stream_items(c, self.positions[c]) for c in mine}
        windows: dict[int, deque[_Item]] = {c: deque() for c in mine}
        delivered = {c: self.positions[c].delivered for c in mine}
        step, micro = self.start_step, self.start_micro
        while True:
            rows, frames, embs, keys, captions, image_keys, metas, pos = [], [], [], [], [], [], [], {}
            for row, c in enumerate(lay.micro_streams(step, micro)):
                if c not in items:
                    continue
                window = windows[c]
                if not window:
                    window.append(next(items[c]))
                item = window.popleft()
                sources = self._image_sources(item.sample, window, items[c])
                video = item.sample.frames
                if sources:
                    rng = np.random.default_rng(seed_words(sp.seed, c, delivered[c], SALT_TRAIN_IMAGE_FRAMES))
                    picks = [src.frames[int(rng.integers(src.frames.shape[0]))] for src in sources]
                    video = np.concatenate([video, np.stack(picks)])
                delivered[c] += 1
                rows.append(row)
                frames.append(video)
                embs.append(item.sample.text_emb)
                keys.append(item.sample.key)
                captions.append(item.sample.caption)
                metas.append({MOTION_FIELD: item.sample.meta.get(MOTION_FIELD)})
                image_keys.append([src.key for src in sources])
                pos[c] = [item.epoch, item.offset, delivered[c], item.skipped, item.filtered, item.lost_shards]
            yield {"rows": rows, "video": to_unit_range(np.stack(frames)) if frames else None, "text_emb": embs,
                   "keys": keys, "captions": captions, "image_keys": image_keys, "metas": metas, "pos": pos}
            micro += 1
            if micro == lay.grad_accum:
                step, micro = step + 1, 0


def assemble(parts: list[dict], num_frames: int) -> dict:
    """One micro-batch from its workers' parts, rows in slot order (text padded to the batch's longest)."""
    order = sorted((row, p, i) for p, part in enumerate(parts) for i, row in enumerate(part["rows"]))
    videos = [part["video"] for part in parts if part["video"] is not None]
    video = torch.cat(videos) if len(videos) > 1 else videos[0]
    flat = [(p, i) for p, part in enumerate(parts) for i in range(len(part["rows"]))]  # rows in cat order
    index = {pi: n for n, pi in enumerate(flat)}
    perm = [index[(p, i)] for _, p, i in order]
    if perm != list(range(len(perm))):
        video = video[perm]
    embs = [parts[p]["text_emb"][i] for _, p, i in order]
    length = max([1] + [e.shape[0] for e in embs])
    emb = np.zeros((len(embs), length, embs[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(embs), length), dtype=bool)
    for n, e in enumerate(embs):
        emb[n, :e.shape[0]] = e
        mask[n, :e.shape[0]] = True
    return {
        "video": video, "text_emb": torch.from_numpy(emb), "text_mask": torch.from_numpy(mask),
        "num_video_frames": num_frames,
        "keys": [parts[p]["keys"][i] for _, p, i in order],
        "captions": [parts[p]["captions"][i] for _, p, i in order],
        "image_keys": [parts[p]["image_keys"][i] for _, p, i in order],
        MOTION_FIELD: stored_motion([parts[p]["metas"][i] for _, p, i in order]),
    }


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


def _state_header(state: dict | list[dict], train: bool) -> tuple[dict, list[dict]]:
    """(the first state, all states) of a loader state or list of rank states, after checking its form,
    version and kind (train or validation) against this loader's."""
    states = state if isinstance(state, list) else [state]
    if not states or not all(isinstance(s, dict) for s in states):
        raise ValueError(f"loader state: expected a dict or a list of dicts, got {type(state).__name__}")
    first = states[0]
    if first.get("version") != STATE_VERSION:
        raise ValueError(f"loader state: unsupported version {first.get('version')} (this loader writes "
                         f"{STATE_VERSION}; version 1 states predate elastic data order and cannot be continued "
                         "exactly)")
    if bool(first.get("train")) != train:
        raise ValueError(f"loader state: saved from a {'train' if first.get('train') else 'validation'} loader")
    return first, states


@dataclass(frozen=True)
class _SavedTrainState:
    """What a saved train loader state says: every saved stream's position (from all the rank states
    given), the global position and the layout it was saved with."""

    positions: dict[int, StreamPos]
    samples: int  # global samples consumed by the completed global steps
    micro: int  # micro-batch within the next global step
    global_batch: int
    streams: int
    grad_accum: int

    @classmethod
    def parse(cls, first: dict, states: list[dict]) -> _SavedTrainState:
        try:
            saved = cls({int(c): StreamPos(*(int(v) for v in pos)) for s in states for c, pos in s["positions"].items()},
                        int(first["samples"]), int(first["micro"]), int(first["global_batch"]), int(first["streams"]),
                        int(first["grad_accum"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"loader state: malformed positions/samples ({e!r})") from None
        if any(p.epoch < 0 or p.offset < 0 or p.delivered < 0 for p in saved.positions.values()) or saved.samples < 0:
            raise ValueError("loader state: negative positions")
        return saved

    @property
    def oldest(self) -> int:
        """The oldest epoch any saved stream is in."""
        return min(p.epoch for p in self.positions.values()) if self.positions else 0


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
        self.layout = Layout(spec.global_batch, spec.streams, spec.rank, spec.batch_size, spec.grad_accum) \
            if spec.train else None
        self.step = 0  # global step of the next micro-batch (train)
        self.micro = 0  # its micro-batch index within the step (0 <= micro < grad_accum)
        self.consumed = 0  # micro-batches handed to the caller by this loader object (train)
        self.positions: dict[int, StreamPos] = \
            {c: StreamPos() for c in self.layout.rank_streams()} if spec.train else {}
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
        return sum(p.skipped for p in self.positions.values())

    @property
    def skipped_shards(self) -> int:
        """Shards this rank's train streams gave up after every download try (for monitoring)."""
        return sum(p.lost_shards for p in self.positions.values())

    @property
    def filtered_samples(self) -> int:
        """Samples this rank's train streams left out for data.min_motion so far (for monitoring)."""
        return sum(p.filtered for p in self.positions.values())

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's streams is still in."""
        return min(p.epoch for p in self.positions.values())

    @property
    def samples(self) -> int:
        """Global samples consumed by the completed global steps (the position in the global sequence)."""
        return self.step * self.spec.global_batch

    def __len__(self) -> int:
        """Batches per validation pass on this rank (train loaders are infinite)."""
        if self.spec.train:
            raise TypeError("a train loader is infinite and has no len()")
        n = len(val_plan(self.spec.index.counts, rank=self.spec.rank, world_size=self.spec.world_size))
        return -(-n // self.spec.batch_size)

    def _dataloader(self, dataset: IterableDataset, num_workers: int) -> DataLoader:
        kwargs = {}
        if num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": worker_context(self.start_method),
                      "worker_init_fn": functools.partial(_worker_init, os.getpid()),
                      "pin_memory": torch.cuda.is_available()}  # page-locked batches for non_blocking copies
        return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_passthrough, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        if not self.spec.train:
            yield from self._dataloader(ShardStream(self.spec), self.num_workers)
            return
        self._generation += 1  # a newer iter() or load_state_dict() ends this iterator (no stale updates)
        generation = self._generation
        # one worker per stream at most: a worker without streams would only pass empty parts around
        workers = min(self.num_workers, len(self.positions))
        dataset = TrainStream(self.spec, self.layout, {c: StreamPos(**vars(p)) for c, p in self.positions.items()},
                              self.step, self.micro, max(1, workers))
        parts: list[dict] = []
        for part in self._dataloader(dataset, workers):
            if generation != self._generation:
                return
            parts.append(part)
            if len(parts) < max(1, workers):
                continue
            for part in parts:
                for c, pos in part["pos"].items():
                    self.positions[int(c)] = StreamPos(*pos)
            batch = assemble(parts, self.spec.num_frames)
            parts = []
            self.consumed += 1
            self.micro += 1
            if self.micro == self.spec.grad_accum:
                self.step, self.micro = self.step + 1, 0
            yield batch

    # -- resumption
    def state_dict(self) -> dict:
        sp = self.spec
        state = {"version": STATE_VERSION, "train": sp.train, "rank": sp.rank, "world_size": sp.world_size,
                 "seed": sp.seed, "batch_size": sp.batch_size, "shuffle_buffer": sp.shuffle_buffer,
                 "dataset": sp.index.fingerprint()}
        if not sp.train:
            return state
        return {**state, "grad_accum": sp.grad_accum, "global_batch": sp.global_batch, "streams": sp.streams,
                "min_motion": sp.min_motion,
                "samples": self.samples, "micro": self.micro,
                "positions": {str(c): [p.epoch, p.offset, p.delivered, p.skipped, p.filtered, p.lost_shards]
                              for c, p in self.positions.items()}}

    def load_state_dict(self, state: dict | list[dict], *, strict: bool = True) -> None:
        """Restore a position saved by state_dict(); call before iterating.

        `state` is one rank's state, or the list of every rank's states of the saved run (needed when
        the number of ranks, or the global batch size, changed: each stream's position is in the state
        of the rank that read it). The sample sequence depends on seed and shuffle_buffer; with either
        changed an exact resume is impossible: strict=True refuses (naming the field and both values),
        strict=False warns and restarts every stream at the start of the oldest saved epoch.
        Another number of ranks or workers resumes exactly, at the next global sample. Another global
        batch size continues at the same global sample when data.streams is unchanged and a multiple of
        both sizes; otherwise (the default data.streams follows the global batch size) every stream
        restarts at the share of the oldest saved epoch the saved run had consumed: approximate, some
        samples of that epoch are seen twice or not at all. Both cases warn, naming the old and new sizes.
        """
        self._generation += 1
        first, states = _state_header(state, self.spec.train)
        if not self.spec.train:
            return
        saved = _SavedTrainState.parse(first, states)
        if not self._same_sequence(first, saved.oldest, strict):
            self._restart(saved.oldest, 0.0, saved.samples)
            return
        self._warn_changed_data(first)
        self._continue_at(saved)

    def _same_sequence(self, first: dict, oldest: int, strict: bool) -> bool:
        """Whether the saved run had this run's sample sequence (data.seed, data.shuffle_buffer). When it
        had not: strict raises, else this warns and returns False (the caller restarts at `oldest`)."""
        sp = self.spec
        for key, have, what in [("seed", sp.seed, "data.seed"), ("shuffle_buffer", sp.shuffle_buffer,
                                                                  "data.shuffle_buffer")]:
            if first.get(key) != have:
                msg = (f"loader state: {key} was {first.get(key)} when saved, this run has {what} = {have}; "
                       "an exact data resume needs the same value")
                if strict:
                    raise ValueError(msg + f" (or load with strict=False to restart at epoch {oldest})")
                log.warning("%s; restarting all streams at the start of epoch %d", msg, oldest)
                return False
        return True

    def _warn_changed_data(self, first: dict) -> None:
        """Warn when the saved positions point into other data: another data.min_motion or other shards."""
        sp = self.spec
        if float(first.get("min_motion", 0.0)) != sp.min_motion:
            log.warning("loader state: data.min_motion was %g when saved, this run has %g; resuming at the saved "
                        "positions, but from here on other samples are skipped", float(first.get("min_motion", 0.0)),
                        sp.min_motion)
        if first.get("dataset") != sp.index.fingerprint():
            log.warning("loader state: the shards in %s changed since the state was saved; resuming at the saved "
                        "epochs/offsets, but the sample order differs", sp.index.source)

    def _continue_at(self, saved: _SavedTrainState) -> None:
        """Take over the saved stream positions: exactly when the canonical streams are the same (any
        number of ranks or workers), else approximately (a restart at the consumed share of the epoch)."""
        sp = self.spec
        same_layout = saved.global_batch == sp.global_batch and saved.streams == sp.streams
        if saved.micro and not (same_layout and saved.grad_accum == sp.grad_accum):
            raise ValueError(f"loader state: saved in the middle of a global step (micro-batch {saved.micro} of "
                             f"{saved.grad_accum}); it can only be continued with the same global batch and "
                             "grad_accum")
        if saved.streams != sp.streams or saved.samples % sp.global_batch:
            fraction = self._epoch_fraction(saved.positions, saved.oldest, saved.streams)
            log.warning("loader state: global batch size %d → %d (data.streams %d → %d): the canonical streams "
                        "differ, so every stream restarts at %.1f%% of epoch %d (approximate: some samples of that "
                        "epoch are seen twice or not at all)", saved.global_batch, sp.global_batch, saved.streams,
                        sp.streams, 100 * fraction, saved.oldest)
            self._restart(saved.oldest, fraction, saved.samples)
            return
        if saved.global_batch != sp.global_batch:
            log.warning("loader state: global batch size %d → %d; continuing at global sample %d of the same "
                        "sequence (data.streams=%d)", saved.global_batch, sp.global_batch, saved.samples, sp.streams)
        missing = [c for c in self.positions if c not in saved.positions]
        if missing:
            raise ValueError(f"loader state: no position for streams {missing[:8]} of this rank; after a change "
                             "of world size pass the list of every rank's saved states")
        self.positions = {c: saved.positions[c] for c in self.positions}
        self.step, self.micro = saved.samples // sp.global_batch, saved.micro

    def _epoch_fraction(self, saved: dict[int, StreamPos], epoch: int, old_streams: int) -> float:
        """Share of `epoch`'s samples the saved streams had consumed (streams already past it count whole)."""
        sizes = epoch_sizes(self.spec.index.counts, seed=self.spec.seed, epoch=epoch, n_streams=old_streams)
        total = sum(sizes)
        done = sum(sizes[c] if p.epoch > epoch else min(p.offset, sizes[c])
                   for c, p in saved.items() if c < len(sizes))
        return done / total if total else 0.0

    def _restart(self, epoch: int, fraction: float, samples: int) -> None:
        """Every stream of this rank at `fraction` of its plan for `epoch`; the step count goes on from
        the saved global sample (rounded down to whole global batches)."""
        sp = self.spec
        sizes = epoch_sizes(sp.index.counts, seed=sp.seed, epoch=epoch, n_streams=sp.streams)
        self.positions = {c: StreamPos(epoch, int(fraction * sizes[c]), 0, 0) for c in self.positions}
        self.step, self.micro = samples // sp.global_batch, 0


# ------------------------------------------------------------------------------------ entry point


def build_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, shards: str | os.PathLike | None = None,
                 train: bool = True, grad_accum: int = 1, index: str | None = None) -> VideoTextLoader:
    """Loader over `shards` (default: cfg.shards for train, cfg.val_shards or cfg.shards otherwise),
    a directory or a shard list (brace patterns, URLs, pipe: commands; data_pipeline.index), whose
    counts come from `index` (default: cfg.index / cfg.val_index; "" = index.json next to the shards).

    `grad_accum` (micro-batches per optimizer step) is part of the global batch size, which places the
    samples of the global sequence on ranks and micro-batches (and sets data.streams when that is 0).
    Raises ShardIndexError (a ValueError naming the field and both values) for a missing or
    mismatched index.json, or shard files it lists that are missing.
    """
    if shards is None:
        use_val = not train and bool(cfg.val_shards)
        shards = cfg.val_shards if use_val else cfg.shards
        index = (cfg.val_index if use_val else cfg.index) if index is None else index
    d = cfg.download
    if d.attempts < 1 or d.timeout_s <= 0 or d.total_timeout_s <= 0 or d.backoff_s < 0 or d.spool_mb < 0:
        raise ValueError(f"data.download: attempts >= 1, timeout_s > 0, total_timeout_s > 0, backoff_s >= 0 and "
                         f"spool_mb >= 0 required, got {d}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if not 0.0 <= cfg.min_motion <= 1.0:
        raise ValueError(f"data.min_motion is a motion score in [0, 1] (0 = off), got {cfg.min_motion}")
    shard_index = read_index(os.fspath(shards), index=index or "", download=cfg.download)
    check_matches(shard_index, encoder=cfg.encoder, frames=cfg.num_frames, height=cfg.image_size, width=cfg.image_size)
    if cfg.min_motion and "motion" not in shard_index.raw:
        log.warning("%s: shards made before motion scores existed; data.min_motion=%g skips only samples whose "
                    "{key}.json has a \"motion\" score (re-shard to score them all)", shard_index.source, cfg.min_motion)
    streams = 0
    if train:
        streams = resolve_streams(cfg.streams, cfg.batch_size * world_size * grad_accum)
        check_enough_samples(shard_index.counts, streams, shard_index.source)
    spec = StreamSpec(
        index=shard_index, train=train, rank=rank, world_size=world_size, workers=max(1, cfg.num_workers),
        batch_size=cfg.batch_size, num_frames=cfg.num_frames, image_frames=cfg.num_image_frames,
        height=cfg.image_size, width=cfg.image_size, max_text_len=cfg.max_text_len,
        shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, grad_accum=grad_accum, streams=streams,
        min_motion=cfg.min_motion, download=cfg.download,
    )
    return VideoTextLoader(spec, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                           start_method=cfg.worker_start_method)
