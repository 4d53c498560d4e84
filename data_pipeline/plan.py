"""Which samples a loader stream reads, in which order: pure functions of (seed, epoch, stream).

Why plans instead of a live shuffle: exact resumption. The sample order of every stream in every
epoch is computed from index.json's per-shard counts alone, so a resumed stream knows, without
reading data, which samples it already delivered and which shards it can skip unopened. The
sample shuffle buffer is *simulated* on indices: the resulting order has the same locality as a
real buffer (at most `buffer` read-but-not-yet-delivered samples held in memory), so the reader
can follow the plan with bounded memory.

Train: a stream is one of the C *canonical* streams of the global sample sequence (data.streams,
default the global batch size; data_pipeline.loader.Layout maps them onto ranks and workers). Nothing
here depends on the number of ranks or loader workers, which is what makes the data order elastic.

- Train: the non-empty shards are permuted per epoch with `seed + epoch` (same on every rank).
  With at least as many shards as streams, stream s takes shards `perm[s::num_streams]` whole;
  otherwise the epoch's samples (the permuted shards concatenated) are cut into `num_streams`
  contiguous, equal (±1) ranges. Either way every sample is in exactly one stream per epoch.
  Then the stream's samples pass a simulated shuffle buffer seeded by (seed, epoch, stream).
- Validation: no shuffle; the rank gets a contiguous, ordered range of all samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK = 0xFFFFFFFF


# Salts: the last word of each seed_words() key, so the random streams drawn from one data.seed for
# different purposes never coincide. Named once here; changing one changes that stream's draws.
SALT_SHARD_ORDER = 0x5A4D  # train: permutation of the shards per epoch
SALT_STREAM_ORDER = 0xB0F  # train: a stream's sample order within its shards
SALT_TRAIN_IMAGE_FRAMES = 0x1A6E  # train: which extra image frames a batch takes (joint training)
SALT_VAL_IMAGE_FRAMES = 0x7A1  # validation: the same, for validation batches


def seed_words(*parts: int) -> list[int]:
    """Non-negative entropy words for np.random.default_rng (seeds may be negative in configs)."""
    return [int(p) & _MASK for p in parts]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard `shard` (index into the index's shard list), read in tar order."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """A stream's epoch: segments in read order and `order`, a permutation of read positions.

    Read position r counts samples across the segments in read order; output position p (what the
    loader's offset counts) delivers read position `order[p]`.
    """

    segments: tuple[Segment, ...]
    order: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.order.shape[0])


def shard_permutation(counts: list[int], seed: int, epoch: int) -> list[int]:
    """Non-empty shard indices in this epoch's order (identical on every rank)."""
    nonempty = np.array([i for i, c in enumerate(counts) if c > 0], dtype=np.int64)
    rng = np.random.default_rng(seed_words(seed, epoch, SALT_SHARD_ORDER))
    return [int(i) for i in rng.permutation(nonempty)]


def split_for_stream(counts: list[int], shard_order: list[int], stream: int, n_streams: int) -> list[Segment]:
    """Stream `stream`'s share of the samples in `shard_order`: whole shards, or a sample range."""
    if len(shard_order) >= n_streams:
        return [Segment(i, 0, counts[i]) for i in shard_order[stream::n_streams]]
    return contiguous_range(counts, shard_order, stream, n_streams)


def contiguous_range(counts: list[int], shard_order: list[int], part: int, parts: int) -> list[Segment]:
    """Part `part` of `parts` equal (±1) contiguous ranges of the shards' samples concatenated."""
    total = sum(counts[i] for i in shard_order)
    lo, hi = part * total // parts, (part + 1) * total // parts
    segments, base = [], 0
    for i in shard_order:
        a, b = max(lo, base), min(hi, base + counts[i])
        if a < b:
            segments.append(Segment(i, a - base, b - base))
        base += counts[i]
    return segments


def buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer of `buffer` slots over n inputs (as input positions).

    Fill the buffer; then each new input replaces a random slot whose content is emitted; at the
    end the rest is emitted in random order. Same locality as webdataset's `shuffle(buffer)`.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    draws = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    slots: list[int] = []
    k = 0
    for i in range(n):
        if len(slots) < buffer:
            slots.append(i)
            continue
        j = int(draws[i] * buffer)
        out[k] = slots[j]
        slots[j] = i
        k += 1
    out[k:] = np.asarray(slots, dtype=np.int64)[rng.permutation(len(slots))]
    return out


def train_plan(counts: list[int], *, seed: int, epoch: int, stream: int, n_streams: int, buffer: int) -> Plan:
    segments = split_for_stream(counts, shard_permutation(counts, seed, epoch), stream, n_streams)
    n = sum(s.size for s in segments)
    rng = np.random.default_rng(seed_words(seed, epoch, stream, n_streams, SALT_STREAM_ORDER))
    return Plan(tuple(segments), buffer_shuffle_order(n, buffer, rng))


def epoch_sizes(counts: list[int], *, seed: int, epoch: int, n_streams: int) -> list[int]:
    """Samples of each stream's plan for `epoch` (cheap: no shuffle simulated)."""
    order = shard_permutation(counts, seed, epoch)
    return [sum(s.size for s in split_for_stream(counts, order, c, n_streams)) for c in range(n_streams)]


def val_plan(counts: list[int], *, rank: int, world_size: int) -> Plan:
    """All samples in index order, the rank's contiguous range (finite, unshuffled)."""
    segments = contiguous_range(counts, list(range(len(counts))), rank, world_size)
    n = sum(s.size for s in segments)
    return Plan(tuple(segments), np.arange(n, dtype=np.int64))


def check_enough_samples(counts: list[int], n_streams: int, where: str) -> None:
    """Every train stream needs at least one sample per epoch, or it would spin without yielding."""
    total = sum(counts)
    nonempty = sum(1 for c in counts if c > 0)
    if nonempty < n_streams and total < n_streams:
        raise ValueError(
            f"{where}: {total} samples cannot feed {n_streams} loader streams (data.streams, by default the global "
            "batch size data.batch_size x world size x grad_accum); use a smaller batch or more data"
        )
