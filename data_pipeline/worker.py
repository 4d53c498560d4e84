"""One shard from manifest rows to a finished tar: fetch → decode → encode clip → embed → write.

A `ShardProcessor` lives for a whole worker process (or SLURM array task): it loads the manifest
and the text encoder once and then makes any number of shards. Captions are embedded in batches
of `encoder.batch_size` videos (the expensive part at BERT-large scale); batch boundaries depend
only on the shard's rows, so every run embeds exactly the same batches (bit-identical output).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.global_motion import MOTION_FIELD
from common.mp4 import encode_mp4
from data_pipeline.config import ShardConfig, config_hash, manifest_cache_dir
from data_pipeline.fetch import FetchError, fetch
from data_pipeline.filters import drop_static, source_check
from data_pipeline.manifest import Manifest, Row, Span
from data_pipeline.stats import ShardStats, write_stats
from data_pipeline.video import Clip, DecodeError, VideoInfo, decode_clips
from data_pipeline.writer import ShardWriter, remove_temp_files, shard_name, stats_name

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (videos ok, videos failed) increments
PROGRESS_EVERY_S = 0.5  # progress reports are batched: one queue message per row costs more than a failed row
REMAP_EVERY_SHARDS = 32  # re-map the manifest copy so a long-lived worker's RSS holds only recent rows
ROW_LOG_LIMIT = 10  # failed rows logged one line each per shard; the rest are summed up in one line


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardProcessor:
    def __init__(self, cfg: ShardConfig, manifest: Manifest | None = None):
        from transformers.utils import logging as hf_logging

        from model.text_encoder import TextEncoder

        hf_logging.disable_progress_bar()  # one bar per run (ours), not one per worker's weight load
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.manifest = manifest or Manifest(cfg.manifest, cfg.manifest_format, cfg.columns,
                                             cache_dir=manifest_cache_dir(cfg), source_root=cfg.source_root)
        e = cfg.encoder
        if e.threads > 0 and torch.get_num_threads() != e.threads:
            torch.set_num_threads(e.threads)  # oversubscribed OpenMP threads stall a busy machine
        self.encoder = TextEncoder(e.name_or_path, device=e.device, dtype=e.dtype, max_length=e.max_length)
        self.encoder.encode(["warm up"])  # lazy kernels/allocations now, not inside the first shard's timing
        self.out_dir = Path(cfg.out_dir)
        self.internal_errors = 0
        self.shards_done = 0

    # ------------------------------------------------------------------ per video
    def _media(self, clip: Clip) -> tuple[str, bytes]:
        s = self.cfg.storage
        if s.format == "npy":
            return "frames.npy", npy_bytes(clip.frames)
        return "mp4", encode_mp4(clip.frames, clip.fps, crf=s.crf, preset=s.preset)

    def _video(self, row: Row, stats: ShardStats) -> tuple[VideoInfo, list[Clip]]:
        fetched = fetch(row.source, self.cfg.fetch)
        info, clips = decode_clips(fetched.path if fetched.path is not None else fetched.data, self.cfg.clip,
                                   self.cfg.decode_threads, accept=source_check(self.cfg.filter))
        return info, self._moving(clips, stats)

    def _moving(self, clips: list[Clip], stats: ShardStats) -> list[Clip]:
        """The clips that pass filter.min_motion; static clips of a source with moving ones are
        counted in the shard stats (`clips_filtered`); a source with none raises static_clip."""
        kept, dropped = drop_static(clips, self.cfg.filter)
        if dropped:
            stats.clips_filtered["static_clip"] += len(dropped)
        return kept

    def _samples(self, row: Row, key: str, info: VideoInfo, clips: list[Clip], stats: ShardStats,
                 span: Span | None = None) -> list[tuple[str, dict[str, bytes]]]:
        samples = []
        for clip in clips:
            t_cpu = time.process_time()
            ext, media = self._media(clip)
            stats.encode_cpu_seconds += time.process_time() - t_cpu
            k = key if self.cfg.clip.clips_per_video == 1 else f"{key}_{clip.index:03d}"
            samples.append((k, {ext: media, "json": self._metadata(row, info, clip, span)}))
        return samples

    def _span_units(self, row: Row, stats: ShardStats) -> list[tuple[str, list]]:
        """A row with clip spans: fetched once, each span decoded on its own (seeking to it) as
        sample `{key}_{span:03d}` with its caption; a bad span fails alone, with its reason. A row
        whose spans all failed before any download (no captions, unreadable times) is not fetched."""
        wanted = any(sp.reject is None for sp in row.spans or ())
        fetched = fetch(row.source, self.cfg.fetch) if wanted else None
        src = None if fetched is None else fetched.path if fetched.path is not None else fetched.data
        units = []
        for sp in row.spans or ():
            key, raw = f"{row.key}_{sp.index:03d}", f"{row.raw_key}_{sp.index:03d}"
            reason, detail = sp.reject, sp.detail
            if reason is None:
                try:
                    span = (sp.start_s, sp.end_s)
                    info, clips = decode_clips(src, self.cfg.clip, self.cfg.decode_threads, span=span,
                                               accept=source_check(self.cfg.filter, span))
                    units.append((sp.caption, self._samples(row, key, info, self._moving(clips, stats), stats, sp)))
                    continue
                except DecodeError as e:
                    reason, detail = e.reason, e.detail
            stats.fail(row.index, raw, reason, detail or f"span {sp.index} [{sp.start_s:g}, {sp.end_s:g})")
            if log.isEnabledFor(level := self._level(stats)):
                log.log(level, "row %d key %r span %d (%s): %s %s", row.index, row.raw_key, sp.index, row.source,
                        reason, detail)
        return units

    def _metadata(self, row: Row, info: VideoInfo, clip: Clip, span: Span | None = None) -> bytes:
        meta = {
            "key": row.key, "raw_key": row.raw_key, "row": row.index, "source": row.source,
            "clip_index": clip.index, "clip_start_s": clip.start_s, "fps": clip.fps, "padded": clip.padded,
            "frames": int(clip.frames.shape[0]), "height": int(clip.frames.shape[1]),
            "width": int(clip.frames.shape[2]), "orig_width": info.width, "orig_height": info.height,
            "orig_fps": info.fps, "duration_s": info.duration_s, "codec": info.codec,
            "container": info.container, "rotation": info.rotation, "encoder": self.encoder.name,
            "motion": round(clip.motion, 6),  # data_pipeline.motion; the loader's data.min_motion reads it
        }
        if clip.global_motion is not None:  # data_pipeline.clip_motion; the loader hands it to the model
            meta[MOTION_FIELD] = clip.global_motion
        if span is not None:
            meta.update(span=span.index, span_start_s=span.start_s, span_end_s=span.end_s)
            if span.clip_id:
                meta["clip_id"] = span.clip_id  # HD-VILA's captions and derived sets are keyed by it
        return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")

    # ------------------------------------------------------------------ per shard
    def run_shard(self, shard: int, progress: Progress | None = None) -> dict:
        cfg = self.cfg
        t_start, t_wall, t_cpu = time.perf_counter(), time.time(), time.process_time()
        rows = self.manifest.shard_rows(shard, cfg.samples_per_shard)
        start = shard * cfg.samples_per_shard
        stats = ShardStats(shard=shard, rows=(start, start + len(rows)), config_hash=self.hash,
                           encoder={"name": self.encoder.name, "dim": self.encoder.dim})
        remove_temp_files(self.out_dir, shard)
        writer = ShardWriter(self.out_dir / shard_name(shard))
        pending: list[tuple[Row, list[tuple[str, list[tuple[str, dict[str, bytes]]]]]]] = []  # (row, [(caption, samples)])
        n_ok = n_failed = 0  # not yet reported to `progress`
        last_report = time.monotonic()
        try:
            for row in rows:
                if self._one(row, stats, pending):
                    n_ok += 1
                else:
                    n_failed += 1
                if progress and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                    progress(n_ok, n_failed)
                    n_ok = n_failed = 0
                    last_report = time.monotonic()
                if len(pending) >= cfg.encoder.batch_size:
                    self._flush(pending, writer, stats)
            self._flush(pending, writer, stats)
            stats.tar_bytes = writer.commit()
        except BaseException:
            writer.abort()
            raise
        if progress and (n_ok or n_failed):
            progress(n_ok, n_failed)
        if len(stats.failures) > ROW_LOG_LIMIT:
            counts = Counter(f["reason"] for f in stats.failures)
            log.warning("shard %d: %d of %d rows failed (%s); the first %d are logged above, all are in %s",
                        shard, len(stats.failures), len(rows), ", ".join(f"{r} {n}" for r, n in counts.most_common()),
                        ROW_LOG_LIMIT, stats_name(shard))
        stats.seconds = time.perf_counter() - t_start
        stats.started, stats.finished = t_wall, time.time()
        stats.cpu_seconds = time.process_time() - t_cpu
        write_stats(self.out_dir, stats)
        self.shards_done += 1
        if self.shards_done % REMAP_EVERY_SHARDS == 0:
            self.manifest.remap()
        return stats.to_json()

    @staticmethod
    def _level(stats: ShardStats) -> int:
        """WARNING for a shard's first ROW_LOG_LIMIT failed rows, then DEBUG (a 10M-row run of
        missing files would otherwise spend more time logging than failing; the shard JSON has all)."""
        return logging.WARNING if len(stats.failures) <= ROW_LOG_LIMIT else logging.DEBUG

    @staticmethod
    def _fail_row(stats: ShardStats, row: Row, reason: str, detail: str) -> None:
        """A whole row failed: one failure, or one per span for a row with spans (each span is an
        item that would have been a sample, so failures / items stays a ratio of like with like)."""
        if row.spans:
            for sp in row.spans:
                stats.fail(row.index, f"{row.raw_key}_{sp.index:03d}", reason, detail)
        else:
            stats.fail(row.index, row.raw_key, reason, detail)

    def _one(self, row: Row, stats: ShardStats, pending: list) -> bool:
        stats.items += len(row.spans) if row.spans else 1
        if row.reject:
            self._fail_row(stats, row, row.reject, f"source {row.source!r}")
            log.log(self._level(stats), "row %d key %r: %s", row.index, row.raw_key, row.reject)
            return False
        try:
            if row.spans is None:
                info, clips = self._video(row, stats)
                units = [(row.caption, self._samples(row, row.key, info, clips, stats))]
            else:
                units = self._span_units(row, stats)
                if not units:
                    return False  # every span failed, each with its reason
        except (FetchError, DecodeError) as e:
            self._fail_row(stats, row, e.reason, e.detail)
            if log.isEnabledFor(level := self._level(stats)):
                log.log(level, "row %d key %r (%s): %s %s", row.index, row.raw_key, row.source, e.reason, e.detail)
            return False
        except Exception as e:  # an unforeseen decoder/encoder failure must not end the run
            self._fail_row(stats, row, "internal_error", f"{type(e).__name__}: {e}")
            self.internal_errors += 1
            if self.internal_errors <= 5:  # tracebacks for the first few; one line each after that
                log.exception("row %d key %r (%s): internal_error", row.index, row.raw_key, row.source)
            else:
                log.error("row %d key %r (%s): internal_error %s: %s", row.index, row.raw_key, row.source,
                          type(e).__name__, e)
            return False
        pending.append((row, units))
        return True

    def _flush(self, pending: list, writer: ShardWriter, stats: ShardStats) -> None:
        if not pending:
            return
        # one caption per unit: per row, or per span of a row with spans (same batches as ever without)
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        embeddings = iter(self.encoder.encode([caption for _, units in pending for caption, _ in units]))
        stats.embed_cpu_seconds += time.process_time() - t_cpu
        stats.embed_seconds += time.perf_counter() - t_wall
        for _row, units in pending:
            for caption, samples in units:
                emb_bytes, txt = npy_bytes(next(embeddings)), caption.encode("utf-8")
                for key, members in samples:
                    writer.add(key, {"txt": txt, "emb.npy": emb_bytes, **members})
                    stats.samples += 1
            stats.ok += 1
        pending.clear()

